//! Rate limiting per client: tower-governor for all traffic, and a much stricter budget for
//! failed signature checks (a sender bursts; an attacker guesses). Memory stays bounded: both
//! limiters forget idle clients on every [`FailureLimiter::maintain`] tick, and the failure
//! table is trimmed whenever it reaches `max_clients`.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::Request;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use tower_governor::GovernorError;
use tower_governor::key_extractor::KeyExtractor;

use super::client_ip::{client_ip, limit_key};
use crate::config::RateLimitConfig;

/// tower-governor key: the real client (see [`client_ip`]), IPv6 by /64.
#[derive(Clone)]
pub struct ClientKey {
    pub trusted_proxies: Arc<[IpNet]>,
}

impl KeyExtractor for ClientKey {
    type Key = IpAddr;

    fn extract<T>(&self, req: &Request<T>) -> Result<Self::Key, GovernorError> {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .ok_or(GovernorError::UnableToExtractKey)?
            .0
            .ip();
        // A malformed header is answered 400 by the error handler, before any budget is drawn.
        client_ip(peer, req.headers(), &self.trusted_proxies)
            .map(limit_key)
            .map_err(|_| GovernorError::UnableToExtractKey)
    }
}

/// Counts failed signature checks per client; past the budget, the client's failures are
/// answered 429 until the budget refills. Its valid deliveries still pass: the signature is
/// checked whatever the budget says (HMAC-SHA256 over a bounded body is cheap), so an
/// attacker who shares an address with a real sender (NAT, a /64) cannot lock the sender out.
pub struct FailureLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    max_clients: usize,
}

impl FailureLimiter {
    pub fn new(config: &RateLimitConfig) -> Self {
        let quota = Quota::per_minute(config.failed_per_minute).allow_burst(config.failed_burst);
        Self {
            limiter: RateLimiter::keyed(quota),
            max_clients: config.max_clients,
        }
    }

    /// Counts one failure; returns how long to wait if the budget is spent.
    pub fn record_failure(&self, key: IpAddr) -> Option<Duration> {
        if self.limiter.len() >= self.max_clients {
            // Clients with a full budget again carry no information: forget them first.
            self.limiter.retain_recent();
        }
        let not_until = self.limiter.check_key(&key).err()?;
        Some(
            not_until
                .wait_time_from(DefaultClock::default().now())
                .max(Duration::from_secs(1)),
        )
    }

    /// Forgets clients that have been quiet long enough to have a full budget again.
    pub fn maintain(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// Seconds to announce in `Retry-After`: rounded up, never 0.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// The all-traffic quota: `per_second` sustained, `burst` at once.
pub fn traffic_period(per_second: NonZeroU32) -> Duration {
    Duration::from_secs(1) / per_second.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_clients: usize) -> RateLimitConfig {
        let one = NonZeroU32::new(1).unwrap();
        RateLimitConfig {
            per_second: one,
            burst: one,
            failed_per_minute: one,
            failed_burst: one,
            max_clients,
        }
    }

    #[test]
    fn failures_past_the_budget_wait() {
        let limiter = FailureLimiter::new(&config(10));
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(
            limiter.record_failure(client),
            None,
            "the burst allows one failure"
        );
        let wait = limiter
            .record_failure(client)
            .expect("second failure exhausts the budget");
        assert!(
            wait > Duration::from_secs(50) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        assert_eq!(
            limiter.record_failure("192.0.2.2".parse().unwrap()),
            None,
            "others are not affected"
        );
    }
}
