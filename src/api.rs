//! ComplianceLayer's REST API, as reconcile and enrichment read it (`../shared/api/`: base
//! URL `https://api.compliancelayer.net/v1`, `Authorization: Bearer cl_…`, errors as
//! `{"error", "message", "status"}`, 429 with `Retry-After`). The client keeps to the API's
//! limits by itself: after a 429, or an answer that says no request is left
//! (`X-RateLimit-Remaining: 0`), it refuses to call again before the time the API gave, so no
//! caller can hammer it. The key never reaches an error, a log line or a debug print.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::config::api::ApiConfig;

/// How long to wait after a 429 that says nothing of when to come back.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);
/// The most of an error answer kept for its message.
const ERROR_BODY: usize = 4096;

/// Why the API gave nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 401 or 403: the key is wrong, revoked, or its plan does not reach this.
    #[error("the API refused the key (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
    /// 429, or the client waiting out one: come back after `retry_after`.
    #[error("rate limited by the API: retry in {}", humantime::format_duration(*retry_after))]
    RateLimited { retry_after: Duration },
    /// 5xx: worth trying again later.
    #[error("the API failed (HTTP {status}): {message}")]
    Server { status: u16, message: String },
    /// Any other answer (404 for a job it does not know, say).
    #[error("the API answered HTTP {status}: {message}")]
    Rejected { status: u16, message: String },
    /// No answer: refused connection, timeout, TLS.
    #[error("cannot reach the API: {0}")]
    Unreachable(String),
    /// A 2xx whose body is not what the reference describes.
    #[error("the API's answer is not as documented: {0}")]
    Shape(String),
}

impl ApiError {
    /// Whether a later try may succeed without anyone changing the configuration.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::Refused { .. } | Self::Rejected { .. })
    }
}

/// A client of one source's API.
pub struct Api {
    http: reqwest::Client,
    base: url::Url,
    key: String,
    /// Not before then: a 429's `Retry-After`, or the reset of a spent allowance.
    quiet_until: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

impl Api {
    /// A client for `config`; `None` when the configuration was read without its key.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(config: &ApiConfig) -> Result<Option<Self>, ApiError> {
        let Some(key) = config.key.clone() else {
            return Ok(None);
        };
        crate::sinks::install_tls_provider();
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("hookroute/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|err| ApiError::Unreachable(err.without_url().to_string()))?;
        // `join` keeps the base's last segment (`/v1`) only when it ends with a slash.
        let mut base = config.base_url.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        Ok(Some(Self {
            http,
            base,
            key,
            quiet_until: Mutex::new(None),
        }))
    }

    /// `GET /scan/history`: up to the 100 most recent scans, each as the API gives it.
    ///
    /// # Errors
    /// [`ApiError`], as every call.
    pub async fn history(&self) -> Result<Vec<Value>, ApiError> {
        list(
            self.json("scan/history").await?,
            &["scans", "history", "data", "results"],
        )
    }

    /// `GET /domains/alerts`: alerts for monitored domains.
    pub async fn alerts(&self) -> Result<Vec<Value>, ApiError> {
        list(
            self.json("domains/alerts").await?,
            &["alerts", "data", "results"],
        )
    }

    /// `GET /scan/jobs/:job_id/report`: a completed scan's full report.
    pub async fn report(&self, job_id: &str) -> Result<Value, ApiError> {
        self.json(&format!("scan/jobs/{}/report", segment(job_id)))
            .await
    }

    /// `GET /compliance/reports/:job_id/pdf`: the PDF report, at most `most` bytes (a larger
    /// one is refused rather than cut).
    pub async fn pdf(&self, job_id: &str, most: usize) -> Result<Vec<u8>, ApiError> {
        let mut response = self
            .get(&format!("compliance/reports/{}/pdf", segment(job_id)))
            .await?;
        let mut pdf = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|err| ApiError::Unreachable(crate::sinks::describe(err)))?
        {
            if pdf.len() + chunk.len() > most {
                return Err(ApiError::Shape(format!(
                    "the PDF is larger than {most} bytes"
                )));
            }
            pdf.extend_from_slice(&chunk);
        }
        Ok(pdf)
    }

    async fn json(&self, path: &str) -> Result<Value, ApiError> {
        let response = self.get(path).await?;
        let body = response
            .bytes()
            .await
            .map_err(|err| ApiError::Unreachable(crate::sinks::describe(err)))?;
        serde_json::from_slice(&body).map_err(|err| ApiError::Shape(err.to_string()))
    }

    /// One GET, unless the API asked for quiet; a non-2xx answer is classified.
    async fn get(&self, path: &str) -> Result<reqwest::Response, ApiError> {
        if let Some(until) = *self.quiet_until.lock().unwrap_or_else(|p| p.into_inner()) {
            let now = Instant::now();
            if now < until {
                return Err(ApiError::RateLimited {
                    retry_after: until - now,
                });
            }
        }
        let url = self
            .base
            .join(path)
            .map_err(|err| ApiError::Shape(err.to_string()))?;
        let response = self
            .http
            .get(url)
            .bearer_auth(&self.key)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|err| ApiError::Unreachable(crate::sinks::describe(err)))?;
        let status = response.status();
        let wait = wait_asked(&response);
        if let Some(wait) = wait {
            *self.quiet_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Instant::now() + wait);
        }
        if status.is_success() {
            return Ok(response);
        }
        let code = status.as_u16();
        let message = message(response).await;
        Err(match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ApiError::Refused {
                status: code,
                message,
            },
            StatusCode::TOO_MANY_REQUESTS => ApiError::RateLimited {
                retry_after: wait.unwrap_or(DEFAULT_RETRY_AFTER),
            },
            s if s.is_server_error() => ApiError::Server {
                status: code,
                message,
            },
            _ => ApiError::Rejected {
                status: code,
                message,
            },
        })
    }
}

/// How long the answer asks the client to keep quiet: a 429's `Retry-After` (or a minute),
/// or, once `X-RateLimit-Remaining` is 0, until `X-RateLimit-Reset` (seconds from now, or a
/// Unix time).
fn wait_asked(response: &reqwest::Response) -> Option<Duration> {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::trim)
    };
    if response.status() == StatusCode::TOO_MANY_REQUESTS {
        return Some(
            header("retry-after")
                .and_then(crate::sinks::parse_retry_after)
                .unwrap_or(DEFAULT_RETRY_AFTER),
        );
    }
    if header("x-ratelimit-remaining")? != "0" {
        return None;
    }
    let reset: u64 = header("x-ratelimit-reset")
        .and_then(|reset| reset.parse().ok())
        .unwrap_or(DEFAULT_RETRY_AFTER.as_secs());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    // A Unix time is far larger than any number of seconds to wait.
    Some(Duration::from_secs(if reset > now {
        reset - now
    } else {
        reset
    }))
}

/// The API's `message` (or `error`), else the start of the body.
async fn message(response: reqwest::Response) -> String {
    let body = response.bytes().await.unwrap_or_default();
    let body = &body[..body.len().min(ERROR_BODY)];
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let said = parsed.as_ref().and_then(|error| {
        error
            .get("message")
            .or_else(|| error.get("error"))
            .and_then(Value::as_str)
    });
    let text = said.map_or_else(|| String::from_utf8_lossy(body).into_owned(), str::to_owned);
    crate::text::printable(text.trim()).into_owned()
}

/// The entries of a list answer: the array itself, or the first of `keys` that holds one.
fn list(answer: Value, keys: &[&str]) -> Result<Vec<Value>, ApiError> {
    match answer {
        Value::Array(entries) => Ok(entries),
        Value::Object(mut object) => keys
            .iter()
            .find_map(|key| match object.remove(*key) {
                Some(Value::Array(entries)) => Some(entries),
                _ => None,
            })
            .ok_or_else(|| ApiError::Shape(format!("no list under any of {keys:?}"))),
        _ => Err(ApiError::Shape("not a list".into())),
    }
}

/// A job id as one path segment: whatever a sender put in it cannot reach another path.
fn segment(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;

    use super::*;

    const KEY: &str = "cl_test_key_0123456789";

    /// A loopback stand-in for the API: counts requests, checks the key, and answers each
    /// path as the test says.
    async fn fake(requests: Arc<AtomicUsize>) -> Api {
        let counted = |answer: fn() -> axum::response::Response| {
            let requests = Arc::clone(&requests);
            get(move |headers: HeaderMap| async move {
                requests.fetch_add(1, Ordering::SeqCst);
                let bearer = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                if bearer != format!("Bearer {KEY}") {
                    return (
                        StatusCode::UNAUTHORIZED,
                        r#"{"error":"unauthorized","message":"Invalid or missing authentication","status":401}"#,
                    )
                        .into_response();
                }
                answer()
            })
        };
        let app = axum::Router::new()
            .route(
                "/v1/scan/history",
                counted(|| {
                    r#"{"scans":[{"job_id":"job_1","domain":"example.com"}]}"#.into_response()
                }),
            )
            .route(
                "/v1/domains/alerts",
                counted(|| {
                    (
                        StatusCode::TOO_MANY_REQUESTS,
                        [("retry-after", "2")],
                        r#"{"error":"rate_limited","message":"slow down","status":429}"#,
                    )
                        .into_response()
                }),
            )
            .route(
                "/v1/scan/jobs/{job}/report",
                counted(|| {
                    (
                        [("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "30")],
                        r#"{"findings":[]}"#,
                    )
                        .into_response()
                }),
            )
            .route(
                "/v1/compliance/reports/{job}/pdf",
                counted(|| vec![b'%'; 2048].into_response()),
            )
            .route(
                "/v1/scan/recent",
                counted(|| (StatusCode::BAD_GATEWAY, "upstream").into_response()),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let config = ApiConfig {
            base_url: format!("http://{addr}/v1").parse().unwrap(),
            key: Some(KEY.into()),
            reconcile: None,
            lookback: Duration::from_secs(3600),
            timeout: Duration::from_secs(5),
            enrich_wait: Duration::from_secs(10),
            pdf_max_bytes: 1 << 20,
        };
        Api::new(&config).unwrap().unwrap()
    }

    #[tokio::test]
    async fn lists_reports_and_refusals_as_the_reference_gives_them() {
        let requests = Arc::new(AtomicUsize::new(0));
        let api = fake(Arc::clone(&requests)).await;
        let scans = api.history().await.unwrap();
        assert_eq!(scans[0]["job_id"], "job_1");
        let large = api.pdf("job_1", 1024).await.unwrap_err();
        assert!(matches!(large, ApiError::Shape(_)), "{large}");
        assert_eq!(api.pdf("job_1", 4096).await.unwrap().len(), 2048);
        let failed = api.json("scan/recent").await.unwrap_err();
        assert!(failed.is_transient() && matches!(failed, ApiError::Server { status: 502, .. }));

        let mut wrong = fake(Arc::clone(&requests)).await;
        wrong.key = "cl_revoked".into();
        let refused = wrong.history().await.unwrap_err();
        assert_eq!(
            refused,
            ApiError::Refused {
                status: 401,
                message: "Invalid or missing authentication".into()
            }
        );
        assert!(!refused.is_transient());
        assert!(
            !format!("{wrong:?}{refused}").contains("cl_"),
            "never the key"
        );
    }

    /// After a 429, or an answer that spends the allowance, the client waits as told: the
    /// next call is refused without a request.
    #[tokio::test]
    async fn keeps_quiet_as_long_as_the_api_asks() {
        let requests = Arc::new(AtomicUsize::new(0));
        let api = fake(Arc::clone(&requests)).await;
        let limited = api.alerts().await.unwrap_err();
        assert_eq!(
            limited,
            ApiError::RateLimited {
                retry_after: Duration::from_secs(2)
            }
        );
        assert_eq!(requests.load(Ordering::SeqCst), 1);
        let again = api.history().await.unwrap_err();
        assert!(
            matches!(again, ApiError::RateLimited { retry_after } if retry_after <= Duration::from_secs(2)),
            "{again}"
        );
        assert_eq!(requests.load(Ordering::SeqCst), 1, "no request while quiet");

        let spent = fake(Arc::clone(&requests)).await;
        spent.report("job/../../secret").await.unwrap();
        let next = spent.history().await.unwrap_err();
        assert!(
            matches!(next, ApiError::RateLimited { retry_after } if retry_after > Duration::from_secs(25)),
            "{next}"
        );
        assert_eq!(requests.load(Ordering::SeqCst), 2);
    }
}
