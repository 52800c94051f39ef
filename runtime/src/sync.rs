//! Poison-tolerant locking of std mutexes.
//!
//! Owns the one rule every crate follows for `std::sync::Mutex`: a lock whose holder panicked is
//! still taken, with the data as the holder left it. That is only sound because every critical
//! section in Membrane leaves its data consistent at each step; code that cannot promise that
//! must not use this helper.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks a std mutex, recovering the data if a panicking holder poisoned it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_mutex_is_still_locked_with_its_data() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let held = m.clone();
        let panicked = std::thread::spawn(move || {
            let mut guard = held.lock().unwrap_or_else(PoisonError::into_inner);
            *guard = 2;
            panic!("poison the mutex");
        })
        .join();
        assert!(panicked.is_err());
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m), 2);
    }
}
