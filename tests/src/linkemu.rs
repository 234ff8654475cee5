//! The userspace link emulator (this kernel has no netem).
//!
//! It sits in its own network namespace between two veth ends `a` (towards the edge) and
//! `b` (towards the ISP) and forwards every Ethernet frame between them through AF_PACKET
//! sockets, so it works for any IP traffic (QUIC, kernel MPTCP, ICMP, ARP). Each direction
//! has a bottleneck: a rate, a FIFO queue measured in milliseconds of that rate (deep, like
//! a cellular modem's), a base delay, jitter (order-preserving), random loss, and a black
//! hole switch (frames silently vanish; carrier stays up).
//!
//! Control: a Unix stream socket taking one command per line, answering `ok` or `error: …`:
//! `set KEY=VALUE…` with keys `rate_kbit` (0 = unlimited), `queue_ms`, `delay_ms`,
//! `jitter_ms`, `loss` (0.0–1.0), `blackhole` (0/1), `dir` (`both`, `up`, `down`);
//! `outage MS` (black hole for MS milliseconds); `stats`; `queue` (the wait of the frames
//! admitted since the last `queue`, in whole milliseconds of the bottleneck's FIFO:
//! `up_p50_ms=… up_p99_ms=… down_p50_ms=… down_p99_ms=…`, then it starts again).
#![allow(unsafe_code)] // AF_PACKET sockets through libc: a test tool, not the product.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub rate_kbit: u64,
    pub queue_ms: u64,
    pub delay_ms: f64,
    pub jitter_ms: f64,
    pub loss: f64,
    pub blackhole: bool,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            rate_kbit: 0,
            queue_ms: 500,
            delay_ms: 0.0,
            jitter_ms: 0.0,
            loss: 0.0,
            blackhole: false,
        }
    }
}

/// Frames waiting with their delivery time, the last departure and the last delivery.
type Fifo = (VecDeque<(Instant, Vec<u8>)>, Instant, Instant);

struct Dir {
    shape: Mutex<Shape>,
    outage_until: Mutex<Option<Instant>>,
    queue: Mutex<Fifo>,
    cv: Condvar,
    passed: AtomicU64,
    dropped: AtomicU64,
    /// Admitted frames by their wait in the FIFO, 1 ms buckets (the last: that or more).
    waits: Mutex<[u64; WAIT_BUCKETS]>,
}

const WAIT_BUCKETS: usize = 1024;

impl Dir {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            shape: Mutex::new(Shape::default()),
            outage_until: Mutex::new(None),
            queue: Mutex::new((VecDeque::new(), now, now)),
            cv: Condvar::new(),
            passed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            waits: Mutex::new([0; WAIT_BUCKETS]),
        }
    }

    /// Admits a frame: loss, black hole, rate and queue limit decide its fate.
    fn admit(&self, frame: Vec<u8>, rng: &mut rand::rngs::SmallRng) {
        let now = Instant::now();
        let s = *self.shape.lock().unwrap_or_else(|e| e.into_inner());
        let out = self
            .outage_until
            .lock()
            .map(|o| o.is_some_and(|t| now < t))
            .unwrap_or(false);
        if s.blackhole || out || (s.loss > 0.0 && rng.random::<f64>() < s.loss) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let (ref mut fifo, ref mut last_depart, ref mut last_deliver) = *q;
        let start = (*last_depart).max(now);
        let depart = match (frame.len() as u64 * 8 * 1_000_000).checked_div(s.rate_kbit) {
            None => now,
            Some(ns) => {
                if start.duration_since(now) > Duration::from_millis(s.queue_ms) {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                start + Duration::from_nanos(ns)
            }
        };
        *last_depart = depart;
        let wait = start.saturating_duration_since(now).as_millis() as usize;
        if let Ok(mut w) = self.waits.lock() {
            w[wait.min(WAIT_BUCKETS - 1)] += 1;
        }
        let jitter = if s.jitter_ms > 0.0 {
            rng.random_range(-s.jitter_ms..s.jitter_ms)
        } else {
            0.0
        };
        let delay = Duration::from_secs_f64(((s.delay_ms + jitter).max(0.0)) / 1000.0);
        let deliver = (depart + delay).max(*last_deliver);
        *last_deliver = deliver;
        fifo.push_back((deliver, frame));
        self.cv.notify_one();
    }

    /// The 50th and 99th percentile of the waits since the last call (ms), then forgets
    /// them.
    fn take_waits(&self) -> (usize, usize) {
        let w = match self.waits.lock() {
            Ok(mut w) => std::mem::replace(&mut *w, [0; WAIT_BUCKETS]),
            Err(_) => return (0, 0),
        };
        let total: u64 = w.iter().sum();
        let at = |q: u64| {
            let mut seen = 0;
            w.iter()
                .position(|n| {
                    seen += n;
                    seen * 100 >= total * q && total > 0
                })
                .unwrap_or(0)
        };
        (at(50), at(99))
    }

    /// Sends queued frames out of `fd` when due.
    fn pump(&self, fd: i32) {
        loop {
            let frame = {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    match q.0.front() {
                        None => q = self.cv.wait(q).unwrap_or_else(|e| e.into_inner()),
                        Some((at, _)) => {
                            let now = Instant::now();
                            if *at <= now {
                                break;
                            }
                            let wait = *at - now;
                            q = self
                                .cv
                                .wait_timeout(q, wait)
                                .map(|r| r.0)
                                .unwrap_or_else(|e| e.into_inner().0);
                        }
                    }
                }
                q.0.pop_front().map(|x| x.1)
            };
            if let Some(f) = frame {
                // SAFETY: fd is an open AF_PACKET socket bound to an interface; f is a
                // valid buffer for the duration of the call.
                let r = unsafe { libc::send(fd, f.as_ptr().cast(), f.len(), 0) };
                if r >= 0 {
                    self.passed.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

fn packet_socket(iface: &str) -> Result<i32> {
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: plain libc calls with valid arguments; results are checked.
    unsafe {
        let index = libc::if_nametoindex(name.as_ptr());
        if index == 0 {
            bail!("no interface {iface}");
        }
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        let r = libc::bind(
            fd,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        if r < 0 {
            bail!("bind {iface}: {}", std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// Reads frames arriving on `from` (not the ones we send) into `dir`.
fn reader(fd: i32, dir: Arc<Dir>) {
    let mut rng = rand::rngs::SmallRng::from_os_rng();
    let mut buf = vec![0u8; 65536];
    loop {
        // SAFETY: buf and sll are valid for writes of the given sizes.
        let (n, pkttype) = unsafe {
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let n = libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut sll as *mut libc::sockaddr_ll).cast(),
                &mut len,
            );
            (n, sll.sll_pkttype)
        };
        if n < 0 {
            continue;
        }
        if pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        dir.admit(buf[..n as usize].to_vec(), &mut rng);
    }
}

fn apply(dirs: &[&Dir], args: &[&str]) -> Result<()> {
    let mut targets: Vec<&Dir> = dirs.to_vec();
    let mut updates: Vec<(&str, &str)> = Vec::new();
    for a in args {
        let (k, v) = a.split_once('=').context("expected KEY=VALUE")?;
        if k == "dir" {
            targets = match v {
                "both" => dirs.to_vec(),
                "up" => vec![dirs[0]],
                "down" => vec![dirs[1]],
                _ => bail!("dir is both, up or down"),
            };
        } else {
            updates.push((k, v));
        }
    }
    for d in targets {
        let mut s = d.shape.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in &updates {
            match *k {
                "rate_kbit" => s.rate_kbit = v.parse()?,
                "queue_ms" => s.queue_ms = v.parse()?,
                "delay_ms" => s.delay_ms = v.parse()?,
                "jitter_ms" => s.jitter_ms = v.parse()?,
                "loss" => s.loss = v.parse()?,
                "blackhole" => s.blackhole = *v == "1" || *v == "on" || *v == "true",
                other => bail!("unknown key {other}"),
            }
        }
    }
    Ok(())
}

/// Runs the emulator between interfaces `a` and `b` until killed.
pub fn run(a: &str, b: &str, control: &std::path::Path, initial: &[&str]) -> Result<()> {
    let (fa, fb) = (packet_socket(a)?, packet_socket(b)?);
    // up: a → b (edge to ISP); down: b → a.
    let up = Arc::new(Dir::new());
    let down = Arc::new(Dir::new());
    apply(&[&up, &down], initial)?;
    let _ = std::fs::remove_file(control);
    let listener = UnixListener::bind(control).context("control socket")?;
    for (fd, dir) in [(fa, up.clone()), (fb, down.clone())] {
        std::thread::spawn(move || reader(fd, dir));
    }
    for (fd, dir) in [(fb, up.clone()), (fa, down.clone())] {
        std::thread::spawn(move || dir.pump(fd));
    }
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (up, down) = (up.clone(), down.clone());
        std::thread::spawn(move || {
            let mut w = match stream.try_clone() {
                Ok(w) => w,
                Err(_) => return,
            };
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                let words: Vec<&str> = line.split_whitespace().collect();
                let reply = match words.as_slice() {
                    ["set", args @ ..] => apply(&[&up, &down], args).map(|_| "ok".to_string()),
                    ["outage", ms] => ms
                        .parse::<u64>()
                        .map(|ms| {
                            let until = Instant::now() + Duration::from_millis(ms);
                            for d in [&up, &down] {
                                if let Ok(mut o) = d.outage_until.lock() {
                                    *o = Some(until);
                                }
                            }
                            "ok".to_string()
                        })
                        .map_err(Into::into),
                    ["stats"] => Ok(format!(
                        "up_passed={} up_dropped={} down_passed={} down_dropped={}",
                        up.passed.load(Ordering::Relaxed),
                        up.dropped.load(Ordering::Relaxed),
                        down.passed.load(Ordering::Relaxed),
                        down.dropped.load(Ordering::Relaxed)
                    )),
                    ["queue"] => {
                        let (u50, u99) = up.take_waits();
                        let (d50, d99) = down.take_waits();
                        Ok(format!(
                            "up_p50_ms={u50} up_p99_ms={u99} down_p50_ms={d50} down_p99_ms={d99}"
                        ))
                    }
                    _ => Err(anyhow::anyhow!("unknown command")),
                };
                let text = match reply {
                    Ok(t) => t,
                    Err(e) => format!("error: {e}"),
                };
                if writeln!(w, "{text}").is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}
