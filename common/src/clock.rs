//! The clock behind every time-dependent decision, so that decision logic can be tested with a
//! manual clock instead of sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where "now" comes from.
pub trait Clock: Send + Sync {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;

    /// The current time in whole seconds since the Unix epoch.
    fn unix(&self) -> u64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs())
    }
}

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to; for tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    unix_millis: AtomicU64,
}

impl ManualClock {
    /// A clock standing at `unix` seconds after the epoch.
    pub fn at_unix(unix: u64) -> Self {
        Self {
            unix_millis: AtomicU64::new(unix.saturating_mul(1000)),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let millis = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.unix_millis.fetch_add(millis, Ordering::SeqCst);
    }

    /// Sets the clock to `unix` seconds after the epoch.
    pub fn set_unix(&self, unix: u64) {
        self.unix_millis
            .store(unix.saturating_mul(1000), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.unix_millis.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::at_unix(1_577_836_860);
        assert_eq!(clock.unix(), 1_577_836_860);
        clock.advance(Duration::from_secs(300));
        assert_eq!(clock.unix(), 1_577_837_160);
        clock.set_unix(10);
        assert_eq!(clock.unix(), 10);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.unix() > 1_577_836_800);
    }
}
