//! Rate limiting per client: tower-governor for all traffic, and a much stricter budget for
//! failed signature checks (a sender bursts; an attacker guesses). Memory stays bounded: both
//! limiters forget idle clients on every [`FailureLimiter::maintain`] tick, and the lockout
//! table never grows past `max_clients`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
        Ok(limit_key(client_ip(
            peer,
            req.headers(),
            &self.trusted_proxies,
        )))
    }
}

/// Counts failed signature checks per client; past the budget the client is locked out,
/// valid signatures included, until the budget refills.
pub struct FailureLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    lockout: Mutex<HashMap<IpAddr, Instant>>,
    max_clients: usize,
}

impl FailureLimiter {
    pub fn new(config: &RateLimitConfig) -> Self {
        let quota = Quota::per_minute(config.failed_per_minute).allow_burst(config.failed_burst);
        Self {
            limiter: RateLimiter::keyed(quota),
            lockout: Mutex::new(HashMap::new()),
            max_clients: config.max_clients,
        }
    }

    /// How long `key` must still wait, if it is locked out.
    pub fn locked_for(&self, key: IpAddr) -> Option<Duration> {
        let lockout = self.lockout.lock().unwrap_or_else(|p| p.into_inner());
        let until = *lockout.get(&key)?;
        until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }

    /// Counts one failure; returns the lockout if this one exhausted the budget.
    pub fn record_failure(&self, key: IpAddr) -> Option<Duration> {
        let not_until = self.limiter.check_key(&key).err()?;
        let wait = not_until
            .wait_time_from(DefaultClock::default().now())
            .max(Duration::from_secs(1));
        let mut lockout = self.lockout.lock().unwrap_or_else(|p| p.into_inner());
        if lockout.len() >= self.max_clients {
            let now = Instant::now();
            lockout.retain(|_, until| *until > now);
        }
        // When still full, the failure budget alone keeps answering 429 to this client's
        // failures; only the lockout of its valid requests is skipped.
        if lockout.len() < self.max_clients {
            lockout.insert(key, Instant::now() + wait);
        }
        Some(wait)
    }

    /// Forgets clients that have been quiet long enough to have a full budget again.
    pub fn maintain(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        let now = Instant::now();
        self.lockout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, until| *until > now);
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
    fn lockout_after_the_failure_budget() {
        let limiter = FailureLimiter::new(&config(10));
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(
            limiter.record_failure(client),
            None,
            "the burst allows one failure"
        );
        assert_eq!(limiter.locked_for(client), None);
        let wait = limiter
            .record_failure(client)
            .expect("second failure exhausts the budget");
        assert!(
            wait > Duration::from_secs(50) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        assert!(limiter.locked_for(client).is_some());
        assert_eq!(
            limiter.locked_for("192.0.2.2".parse().unwrap()),
            None,
            "others are not affected"
        );
    }

    #[test]
    fn lockout_table_is_bounded() {
        let limiter = FailureLimiter::new(&config(2));
        for i in 1..=5u8 {
            let client = IpAddr::from([192, 0, 2, i]);
            limiter.record_failure(client);
            assert!(limiter.record_failure(client).is_some());
        }
        assert_eq!(limiter.lockout.lock().unwrap().len(), 2);
    }
}
