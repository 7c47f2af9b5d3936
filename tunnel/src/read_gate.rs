//! Skips polls of a QUIC receive stream that cannot have anything new to read.
//!
//! Readers poll a stream whenever their task wakes, whatever woke it: hyper's HTTP/1.1 client
//! (the gateway's until it got its own) polled its connection's reader 8.5 times per front
//! request (after writing, after each state change, to notice a close), and every poll of a
//! quinn `RecvStream` locks the connection and re-registers the task's waker: ~650
//! instructions, most of them answering `Pending`. The gate
//! hands quinn a waker of its own and remembers a `Pending` answer until that waker fires;
//! meanwhile a poll only registers the task's waker (an atomic swap) and answers `Pending`.
//! Any wake-up quinn sends (data, finish, reset, connection loss) opens the gate again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use atomic_waker::AtomicWaker;

pub(crate) struct ReadGate {
    shared: Arc<Shared>,
    /// The waker quinn is given: wakes `shared`.
    waker: Waker,
    /// The last poll answered `Pending` (quinn holds `waker`).
    armed: bool,
}

struct Shared {
    /// quinn woke the gate since the last poll that went through.
    woken: AtomicBool,
    /// The task that polled last.
    task: AtomicWaker,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl std::fmt::Debug for ReadGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadGate")
            .field("armed", &self.armed)
            .finish()
    }
}

impl ReadGate {
    pub(crate) fn new() -> Self {
        let shared = Arc::new(Shared {
            woken: AtomicBool::new(false),
            task: AtomicWaker::new(),
        });
        ReadGate {
            waker: Waker::from(shared.clone()),
            shared,
            armed: false,
        }
    }

    /// Runs `read` (a poll of the stream, with the context it is given) unless the stream
    /// answered `Pending` last time and has not woken since.
    pub(crate) fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        read: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        // Registered before `woken` is read: a wake-up in between is either seen here or
        // wakes the task just registered.
        self.shared.task.register(cx.waker());
        let woken = self.shared.woken.swap(false, Ordering::AcqRel);
        if self.armed && !woken {
            return Poll::Pending;
        }
        let r = read(&mut Context::from_waker(&self.waker));
        self.armed = r.is_pending();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A task waker counting its wake-ups.
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A stream that answers `data` (Pending if None), counting the times it is asked.
    #[derive(Default)]
    struct Stream {
        reads: usize,
        waker: Option<Waker>,
    }

    impl Stream {
        fn read(
            &mut self,
            gate: &mut ReadGate,
            cx: &mut Context<'_>,
            data: Option<u8>,
        ) -> Poll<u8> {
            gate.poll(cx, |inner| {
                self.reads += 1;
                match data {
                    Some(d) => Poll::Ready(d),
                    None => {
                        self.waker = Some(inner.waker().clone());
                        Poll::Pending
                    }
                }
            })
        }
    }

    #[test]
    fn a_pending_read_is_skipped_until_the_stream_wakes_the_task() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(count.clone());
        let mut cx = Context::from_waker(&task);
        let mut gate = ReadGate::new();
        let mut s = Stream::default();
        assert_eq!(s.read(&mut gate, &mut cx, None), Poll::Pending);
        // Nothing woke: the stream is not asked again, whatever it would say.
        assert_eq!(s.read(&mut gate, &mut cx, Some(1)), Poll::Pending);
        assert_eq!(s.read(&mut gate, &mut cx, Some(1)), Poll::Pending);
        assert_eq!(s.reads, 1);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        // The stream wakes its waker: the task is woken and the next poll reads.
        s.waker.take().unwrap().wake();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(s.read(&mut gate, &mut cx, Some(7)), Poll::Ready(7));
        // After data, the stream is always asked.
        assert_eq!(s.read(&mut gate, &mut cx, Some(8)), Poll::Ready(8));
        assert_eq!(s.reads, 3);
    }

    #[test]
    fn the_task_that_polled_last_is_the_one_woken() {
        let first = Arc::new(Count(AtomicUsize::new(0)));
        let second = Arc::new(Count(AtomicUsize::new(0)));
        let (w1, w2) = (Waker::from(first.clone()), Waker::from(second.clone()));
        let mut gate = ReadGate::new();
        let mut stream_waker = None;
        let _ = gate.poll(&mut Context::from_waker(&w1), |inner| {
            stream_waker = Some(inner.waker().clone());
            Poll::<()>::Pending
        });
        // Another task polls while the gate is closed: it takes over the wake-up.
        assert!(gate
            .poll(&mut Context::from_waker(&w2), |_| Poll::Ready(()))
            .is_pending());
        stream_waker.unwrap().wake();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }
}
