//! A real HTTP server on loopback standing in for Slack or a forwarding target: it records
//! every request and answers from a script (status, headers, body, delay), or 200 "ok".

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;

#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub status: u16,
}

impl Recorded {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    pub delay: Duration,
}

impl Answer {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<Recorded>>,
    script: Mutex<VecDeque<Answer>>,
    down: AtomicBool,
    /// What it answers while down: 503 unless told otherwise.
    down_status: std::sync::atomic::AtomicU16,
    delay: Mutex<Duration>,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

#[derive(Clone)]
pub struct Recorder {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl Recorder {
    pub async fn start() -> Self {
        let state = Arc::new(State::default());
        let shared = Arc::clone(&state);
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
                let state = Arc::clone(&shared);
                async move {
                    let scripted = state.script.lock().unwrap().pop_front();
                    let down = state.down.load(Ordering::SeqCst);
                    let answer = scripted.unwrap_or_else(|| {
                        let down_status = match state.down_status.load(Ordering::SeqCst) {
                            0 => 503,
                            status => status,
                        };
                        let mut answer = Answer::status(if down { down_status } else { 200 });
                        answer.body = if down { "down".into() } else { "ok".into() };
                        answer.delay = *state.delay.lock().unwrap();
                        answer
                    });
                    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    state.most_in_flight.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(answer.delay).await;
                    state.in_flight.fetch_sub(1, Ordering::SeqCst);
                    state.requests.lock().unwrap().push(Recorded {
                        path: uri.path().to_owned(),
                        headers,
                        body,
                        status: answer.status,
                    });
                    let mut response =
                        (StatusCode::from_u16(answer.status).unwrap(), answer.body).into_response();
                    for (name, value) in answer.headers {
                        response.headers_mut().insert(name, value.parse().unwrap());
                    }
                    response
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.state.script.lock().unwrap().extend(answers);
    }

    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Down, answering `status` (a 500, say) instead of 503.
    pub fn set_down_with(&self, status: u16) {
        self.state.down_status.store(status, Ordering::SeqCst);
        self.set_down(true);
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }

    /// The requests it is answering now.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests it was ever answering at once.
    pub fn most_in_flight(&self) -> usize {
        self.state.most_in_flight.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }
}
