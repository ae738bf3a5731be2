//! Who is looking: a user's token, typed once at the login form, traded for a session cookie
//! (HttpOnly, SameSite=Strict, Secure behind an HTTPS proxy, expiring). Tokens are compared
//! as SHA-256 digests in constant time, against every user whatever matched; login attempts
//! are limited per client, so a token cannot be guessed at speed. Each session carries a CSRF token every POST must repeat.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Form, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::WebState;
use crate::config::admin::Role;

/// The session cookie's name.
const COOKIE: &str = "hookroute_session";
/// Login attempts a client may make per minute, after a burst of as many.
const LOGINS: u32 = 5;

/// A logged-in user.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: String,
    pub role: Role,
    /// What every POST of this session must carry.
    pub csrf: String,
    expires: Instant,
}

/// The live sessions, by id, in this daemon's memory (a restart logs everyone out), and the
/// login budget.
pub struct Sessions {
    live: Mutex<HashMap<String, Session>>,
    ttl: Duration,
    attempts: DefaultKeyedRateLimiter<std::net::IpAddr>,
}

impl Sessions {
    pub fn new(ttl: Duration) -> Self {
        let per_minute = NonZeroU32::new(LOGINS).unwrap_or(NonZeroU32::MIN);
        Self {
            live: Mutex::default(),
            ttl,
            attempts: RateLimiter::keyed(Quota::per_minute(per_minute)),
        }
    }

    fn open(&self, user: String, role: Role) -> (String, Session) {
        let id = random_token();
        let session = Session {
            user,
            role,
            csrf: random_token(),
            expires: Instant::now() + self.ttl,
        };
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        live.retain(|_, s| s.expires > now);
        live.insert(id.clone(), session.clone());
        (id, session)
    }

    fn find(&self, id: &str) -> Option<Session> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.get(id).filter(|s| s.expires > Instant::now()).cloned()
    }

    fn close(&self, id: &str) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

/// 32 random bytes, hex.
fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// The session id a request's cookie names.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// A request without a session: pages redirect to the login form, JSON gets 401.
pub struct LoggedOut(bool);

impl IntoResponse for LoggedOut {
    fn into_response(self) -> Response {
        if self.0 {
            (
                StatusCode::UNAUTHORIZED,
                axum::Json(serde_json::json!({"error": "log in first"})),
            )
                .into_response()
        } else {
            Redirect::to("/login").into_response()
        }
    }
}

impl FromRequestParts<Arc<WebState>> for Session {
    type Rejection = LoggedOut;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<WebState>,
    ) -> Result<Self, Self::Rejection> {
        cookie(&parts.headers)
            .and_then(|id| state.sessions.find(id))
            .ok_or(LoggedOut(super::wants_json(&parts.headers)))
    }
}

/// Why a POST was refused (403).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its CSRF token is not the session's: a stale form, or another site's.
    Csrf,
    /// A viewer asked for an operator's action.
    Role,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let why = match self {
            Self::Csrf => "this form has expired: reload the page",
            Self::Role => "only an operator may do this",
        };
        (StatusCode::FORBIDDEN, why).into_response()
    }
}

impl Session {
    /// Refuses a POST whose CSRF token is not this session's, and one by a viewer when
    /// `operator` is asked for.
    pub fn check(&self, csrf: &str, operator: bool) -> Result<(), Refused> {
        if !bool::from(csrf.as_bytes().ct_eq(self.csrf.as_bytes())) {
            return Err(Refused::Csrf);
        }
        if operator && self.role != Role::Operator {
            return Err(Refused::Role);
        }
        Ok(())
    }
}

pub async fn login_form(State(state): State<Arc<WebState>>) -> Response {
    state.page("login.html", minijinja::context! { failed => false })
}

#[derive(Deserialize)]
pub struct Login {
    token: String,
}

pub async fn login(
    State(state): State<Arc<WebState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<Login>,
) -> Response {
    let client = super::client(&state, peer, &headers);
    // Clients whose budget is whole again are forgotten, so the map holds the last minute's.
    state.sessions.attempts.retain_recent();
    if state.sessions.attempts.check_key(&client).is_err() {
        tracing::warn!(%client, "status page: too many logins");
        return (
            StatusCode::TOO_MANY_REQUESTS,
            "too many logins: wait a minute",
        )
            .into_response();
    }
    let typed: [u8; 32] = Sha256::digest(form.token.trim().as_bytes()).into();
    // Every user is compared, whatever matched: the time says nothing of who exists.
    let mut found = None;
    for user in &state.admin.users {
        if let Some(digest) = &user.token_sha256
            && bool::from(digest.ct_eq(&typed))
        {
            found = Some(user);
        }
    }
    let Some(user) = found else {
        tracing::warn!(%client, "status page: login refused");
        let mut page = state.page("login.html", minijinja::context! { failed => true });
        *page.status_mut() = StatusCode::UNAUTHORIZED;
        return page;
    };
    let (id, _) = state.sessions.open(user.name.clone(), user.role);
    tracing::info!(user = %user.name, role = ?user.role, %client, "status page: logged in");
    let secure = if https(&state, peer, &headers) {
        "; Secure"
    } else {
        ""
    };
    let max_age = state.admin.session_ttl.as_secs();
    let set =
        format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}{secure}");
    ([(header::SET_COOKIE, set)], Redirect::to("/")).into_response()
}

/// A form's CSRF token; a form without one is refused as one with a wrong one (403).
#[derive(Deserialize)]
pub struct Csrf {
    #[serde(default)]
    pub(super) csrf: String,
}

/// A form that carries the session's CSRF token.
pub trait Token {
    fn csrf(&self) -> &str;
}

impl Token for Csrf {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// A POST of the page, taken only from a session whose CSRF token the form repeats and, when
/// `OPERATOR`, from an operator: the session and the form. Refused before the handler runs:
/// to the login without a session, 403 for the token or the role, 4xx for a form that does
/// not parse. The last of a handler's arguments (it reads the body).
pub struct Posted<T, const OPERATOR: bool>(pub Session, pub T);

/// What operators alone may post.
pub type Operator<T> = Posted<T, true>;

impl<T, const OPERATOR: bool> FromRequest<Arc<WebState>> for Posted<T, OPERATOR>
where
    T: DeserializeOwned + Token + Send,
{
    type Rejection = Response;

    async fn from_request(request: Request, state: &Arc<WebState>) -> Result<Self, Response> {
        let (mut parts, body) = request.into_parts();
        let session = Session::from_request_parts(&mut parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let Form(form) = Form::<T>::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(IntoResponse::into_response)?;
        session
            .check(form.csrf(), OPERATOR)
            .map_err(IntoResponse::into_response)?;
        Ok(Self(session, form))
    }
}

pub async fn logout(
    State(state): State<Arc<WebState>>,
    headers: HeaderMap,
    Posted(session, _): Posted<Csrf, false>,
) -> Response {
    if let Some(id) = cookie(&headers) {
        state.sessions.close(id);
    }
    tracing::info!(user = %session.user, "status page: logged out");
    let clear = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    ([(header::SET_COOKIE, clear)], Redirect::to("/login")).into_response()
}

/// Whether the page is reached over HTTPS: a trusted proxy's `X-Forwarded-Proto: https`.
fn https(state: &WebState, peer: SocketAddr, headers: &HeaderMap) -> bool {
    crate::http::is_trusted(peer.ip(), &state.trusted_proxies)
        && headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|proto| proto.eq_ignore_ascii_case("https"))
}
