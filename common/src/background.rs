//! Threads that work beside the runtime's, off the request path.

/// The nice value of a background thread: a tenth of the CPU weight of a request thread.
const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority (nice 10 more), for a thread whose work no
/// request waits for (commits made after the answer, log writes). On a machine with as many
/// busy threads as cores, such a thread woken in the middle of a request otherwise takes the
/// core from the runtime thread serving it, which may hold a lock every other request needs.
/// Best effort: a failure (a seccomp filter, say) leaves the thread as it was.
pub fn lower_thread_priority() {
    let thread = rustix::thread::gettid();
    let lowered = rustix::process::getpriority_process(Some(thread)).and_then(|nice| {
        rustix::process::setpriority_process(Some(thread), (nice + BACKGROUND_NICE).min(19))
    });
    if let Err(err) = lowered {
        tracing::debug!(error = %err, "background thread priority unchanged");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_calling_thread_alone_is_lowered() {
        let before = rustix::process::getpriority_process(None).unwrap();
        let lowered = std::thread::spawn(|| {
            lower_thread_priority();
            rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(lowered, (before + BACKGROUND_NICE).min(19));
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), before);
    }
}
