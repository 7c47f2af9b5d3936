//! A point-to-point link with a fixed one-way delay between two network namespaces, for
//! benchmarks over a home-to-VPS round trip (`benches/run.sh wan`, issue 8) on kernels
//! without `sch_netem` (this VM's has none).
//!
//! ```sh
//! delay_wire --delay-ms 10 --a zgwa --b zgwb --b-netns /run/netns/home
//! ```
//! Creates TUN device `--a` in its own network namespace and TUN device `--b` in the one
//! `--b-netns` names, then copies every IP packet read from one to the other once `--delay-ms`
//! has passed: the round trip between the namespaces gains twice the delay. The caller gives
//! the devices their addresses and routes (`ip addr add A peer B dev zgwa`, …) once both
//! exist. Order is kept (the delay is constant, so each direction is a FIFO) and nothing is
//! dropped unless a direction's queue is full (`--queue` packets); the counts, drops
//! included, go to stderr every 5 s and when the wire stops (SIGTERM or SIGINT), so a
//! benchmark can check that the link itself lost nothing.
//!
//! A thread per direction, each with `ppoll` and a sub-millisecond timeout, so the delay is
//! kept to within tens of microseconds. Without `IFF_VNET_HDR` the kernel hands the devices MTU-sized packets only
//! (it segments TCP's large sends first), as a real link would carry them.

// TUN devices, setns and ppoll have no safe wrapper among the dependencies; every unsafe block
// below is a single system call with its SAFETY note.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Join two TUN devices in two network namespaces with a fixed one-way delay")]
struct Args {
    /// One-way delay in milliseconds (the round trip gains twice this).
    #[arg(long)]
    delay_ms: f64,
    /// Name of the TUN device created in this process's network namespace.
    #[arg(long)]
    a: String,
    /// Name of the TUN device created in the namespace `--b-netns` names.
    #[arg(long)]
    b: String,
    /// Network namespace for `--b`: a file such as /run/netns/NAME or /proc/PID/ns/net.
    #[arg(long)]
    b_netns: PathBuf,
    /// Packets queued per direction; a packet arriving to a full queue is dropped (counted).
    #[arg(long, default_value_t = 65_536)]
    queue: usize,
}

/// Largest packet read: a TUN device's MTU can be raised up to 64 KiB.
const MAX_PACKET: usize = 65_536;

/// Packets read from one device per wake-up before due packets are written again.
const READ_BURST: usize = 256;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// One direction of the wire: packets read from `from`, written to `to` when due. The
/// descriptors belong to `main`, which outlives both directions' threads.
struct Direction {
    name: &'static str,
    from: RawFd,
    to: RawFd,
    queue: VecDeque<(Instant, Vec<u8>)>,
    carried: u64,
    dropped_full: u64,
    failed_writes: u64,
}

impl Direction {
    fn new(name: &'static str, from: RawFd, to: RawFd) -> Self {
        Self {
            name,
            from,
            to,
            queue: VecDeque::new(),
            carried: 0,
            dropped_full: 0,
            failed_writes: 0,
        }
    }

    /// Reads what `from` has (at most [`READ_BURST`] packets), each due at `due`.
    fn read(&mut self, buf: &mut [u8], due: Instant, cap: usize) -> io::Result<()> {
        for _ in 0..READ_BURST {
            // SAFETY: `buf` is valid for writes of its length; `from` is an open descriptor.
            let n = unsafe { libc::read(self.from, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let err = io::Error::last_os_error();
                return match err.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(err),
                };
            }
            if self.queue.len() >= cap {
                self.dropped_full += 1;
            } else {
                self.queue.push_back((due, buf[..n as usize].to_vec()));
            }
        }
        Ok(())
    }

    /// Writes every packet due by `now`.
    fn flush(&mut self, now: Instant) {
        while let Some((due, _)) = self.queue.front() {
            if *due > now {
                break;
            }
            let (_, packet) = self.queue.pop_front().expect("front exists");
            // SAFETY: `packet` is valid for reads of its length; `to` is an open descriptor.
            let n = unsafe { libc::write(self.to, packet.as_ptr().cast(), packet.len()) };
            // A TUN write hands the packet to the kernel's receive path; it fails only for a
            // packet the kernel will not take (e.g. the device went down): counted, not fatal.
            if n < 0 {
                self.failed_writes += 1;
            } else {
                self.carried += 1;
            }
        }
    }

    fn report(&self) -> String {
        format!(
            "{} carried {} dropped_full {} failed_writes {} queued {}",
            self.name,
            self.carried,
            self.dropped_full,
            self.failed_writes,
            self.queue.len()
        )
    }
}

/// Creates (or attaches to) TUN device `name` in the calling thread's network namespace.
fn open_tun(name: &str) -> anyhow::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        bail!(
            "TUN device name {name:?}: 1 to {} bytes",
            libc::IFNAMSIZ - 1
        );
    }
    // SAFETY: a NUL-terminated path literal; the result is checked.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error())
            .context("open /dev/net/tun (needs root and the tun module)");
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero ifreq is valid (empty name, zero flags).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads an ifreq, which `req` is, and the descriptor is a TUN device.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &req) } < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("TUNSETIFF {name}"));
    }
    Ok(fd)
}

/// Moves the calling thread into the network namespace `ns` refers to.
fn enter_netns(ns: &File) -> io::Result<()> {
    // SAFETY: `ns` is an open namespace file; setns changes only this thread's namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(args.delay_ms.is_finite() && (0.0..=10_000.0).contains(&args.delay_ms)) {
        bail!("--delay-ms {}: give 0 to 10000 milliseconds", args.delay_ms);
    }
    if args.queue == 0 {
        bail!("--queue 0: give at least 1 packet");
    }
    let delay = Duration::from_secs_f64(args.delay_ms / 1000.0);

    let here = File::open("/proc/thread-self/ns/net").context("open own network namespace")?;
    let there = File::open(&args.b_netns)
        .with_context(|| format!("open network namespace {}", args.b_netns.display()))?;
    let a = open_tun(&args.a)?;
    enter_netns(&there).with_context(|| format!("enter {}", args.b_netns.display()))?;
    let b = open_tun(&args.b);
    // Back home before anything else, whether or not `b` was made: later work (and the
    // caller's view of this process) belongs to the first namespace.
    enter_netns(&here).context("return to own network namespace")?;
    let b = b?;

    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    eprintln!(
        "delay_wire: {} <-> {} ({}), one-way delay {} ms",
        args.a,
        args.b,
        args.b_netns.display(),
        args.delay_ms
    );

    // One thread per direction, so a bulk transfer's data and its acknowledgements do not
    // queue behind each other. (Throughput is the same as with one thread, ~1.3-1.4 Gbit/s
    // for iperf3 across the link on this 2-core VM: CPU, shared with everything else, is
    // the ceiling.)
    let cap = args.queue;
    let back = Direction::new("b->a", b.as_raw_fd(), a.as_raw_fd());
    // Whichever direction ends (a signal, or an error) ends the other too.
    let back = std::thread::spawn(move || {
        let r = run(back, delay, cap);
        STOP.store(true, Ordering::Relaxed);
        r
    });
    let forth = run(
        Direction::new("a->b", a.as_raw_fd(), b.as_raw_fd()),
        delay,
        cap,
    );
    STOP.store(true, Ordering::Relaxed);
    let back = back
        .join()
        .map_err(|_| anyhow::anyhow!("b->a: the thread panicked"))?;
    let (forth, back) = (forth?, back?);
    eprintln!("delay_wire: stopped: {}; {}", forth.report(), back.report());
    Ok(())
}

/// Carries one direction until SIGTERM/SIGINT; returns it for the final counts.
fn run(mut d: Direction, delay: Duration, cap: usize) -> anyhow::Result<Direction> {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut last_report = Instant::now();
    let mut reported = String::new();
    while !STOP.load(Ordering::Relaxed) {
        let now = Instant::now();
        d.flush(now);
        // Wake for the next due packet, or at least every 200 ms to see STOP.
        let wait = d
            .queue
            .front()
            .map(|p| p.0.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(200))
            .min(Duration::from_millis(200));
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        let mut fd = libc::pollfd {
            fd: d.from,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `fd` and `ts` are valid for the call; no signal mask is changed.
        let rc = unsafe { libc::ppoll(&mut fd, 1, &ts, std::ptr::null()) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err).with_context(|| format!("{}: ppoll", d.name));
        }
        if fd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            bail!(
                "{}: the TUN device failed (revents {:#x})",
                d.name,
                fd.revents
            );
        }
        if fd.revents & libc::POLLIN != 0 {
            let due = Instant::now() + delay;
            d.read(&mut buf, due, cap)
                .with_context(|| format!("{}: read", d.name))?;
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            let line = d.report();
            if line != reported {
                eprintln!("delay_wire: {line}");
                reported = line;
            }
            last_report = Instant::now();
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair of packet sockets standing in for the two TUN devices: each write is
    /// one packet, each read returns one whole packet, reads never block.
    fn packet_pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is valid for two descriptors; on success both are ours to own.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: both descriptors were just created and are owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn send(fd: &OwnedFd, packet: &[u8]) {
        // SAFETY: `packet` is valid for reads of its length; `fd` is open.
        let n = unsafe { libc::write(fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        assert_eq!(n, packet.len() as isize);
    }

    /// Every packet waiting on `fd`, in order.
    fn received(fd: &OwnedFd) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: `buf` is valid for writes of its length; `fd` is open.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                return out;
            }
            out.push(buf[..n as usize].to_vec());
        }
    }

    /// A direction between two packet socket pairs, with `packets` waiting at its input: the
    /// direction, the far end its output reaches, and the descriptors it uses (keep them open:
    /// it holds their numbers only).
    fn loaded(name: &'static str, packets: &[&[u8]]) -> (Direction, OwnedFd, [OwnedFd; 3]) {
        let (peer_a, tun_a) = packet_pair();
        let (tun_b, peer_b) = packet_pair();
        for p in packets {
            send(&peer_a, p);
        }
        let d = Direction::new(name, tun_a.as_raw_fd(), tun_b.as_raw_fd());
        (d, peer_b, [peer_a, tun_a, tun_b])
    }

    #[test]
    fn holds_packets_until_due_then_delivers_them_in_order() {
        let (mut d, peer_b, _open) = loaded("a->b", &[b"one", b"two", b"three"]);
        let start = Instant::now();
        let due = start + Duration::from_millis(10);
        d.read(&mut vec![0u8; MAX_PACKET], due, 16).unwrap();
        assert_eq!(d.queue.len(), 3);

        d.flush(start);
        assert!(
            received(&peer_b).is_empty(),
            "a packet left before it was due"
        );
        d.flush(due);
        assert_eq!(received(&peer_b), [&b"one"[..], b"two", b"three"]);
        assert_eq!(
            d.report(),
            "a->b carried 3 dropped_full 0 failed_writes 0 queued 0"
        );
    }

    #[test]
    fn drops_what_a_full_queue_cannot_hold_and_counts_it() {
        let (mut d, peer_b, _open) = loaded("b->a", &[b"1", b"2", b"3"]);
        let now = Instant::now();
        d.read(&mut vec![0u8; MAX_PACKET], now, 2).unwrap();
        d.flush(now);
        assert_eq!(received(&peer_b), [&b"1"[..], b"2"]);
        assert_eq!(
            d.report(),
            "b->a carried 2 dropped_full 1 failed_writes 0 queued 0"
        );
    }

    #[test]
    fn a_write_the_far_side_refuses_is_counted_not_fatal() {
        let (mut d, peer_b, _open) = loaded("a->b", &[b"lost"]);
        drop(peer_b); // the far device is gone: its writes fail
        let now = Instant::now();
        d.read(&mut vec![0u8; MAX_PACKET], now, 4).unwrap();
        d.flush(now);
        // (Rust programs ignore SIGPIPE: the write fails with EPIPE instead of killing us.)
        assert_eq!(
            d.report(),
            "a->b carried 0 dropped_full 0 failed_writes 1 queued 0"
        );
    }
}
