//! The CPU of every process of the storm, sampled on a thread of its own
//! through the whole run, and what the storm cost each of them: the storm
//! window's CPU less the same length at the steady rate before the kill,
//! per resume.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::procs::{self, try_proc_cpu};

/// How often the CPU of every process is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// When a sample was taken, and the CPU of each watched process then.
type Samples = Arc<Mutex<Vec<(Instant, Vec<Duration>)>>>;

/// CPU time of each watched process, every `SAMPLE_EVERY`, on a thread of
/// its own. A process that is gone reads as its last value.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Samples,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(pids: Vec<u32>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples: Samples = Arc::default();
        let (s, out) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            let mut last = vec![Duration::ZERO; pids.len() + 2];
            while !s.load(Ordering::Relaxed) {
                let at = Instant::now();
                for (i, pid) in pids.iter().enumerate() {
                    if let Some(cpu) = try_proc_cpu(*pid) {
                        last[i] = cpu;
                    }
                }
                // The machine's busy and total jiffies, as the last two.
                let (busy, total) = procs::machine_ticks();
                last.truncate(pids.len());
                last.push(Duration::from_micros(busy));
                last.push(Duration::from_micros(total));
                out.lock().expect("samples").push((at, last.clone()));
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
        Sampler {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    /// CPU of each process between the samples nearest `from` and `to`,
    /// and the exact length of that window.
    pub fn between(&self, from: Instant, to: Instant) -> (Vec<Duration>, Duration) {
        let samples = self.samples.lock().expect("samples");
        let nearest = |t: Instant| {
            samples
                .iter()
                .min_by_key(|(at, _)| if *at > t { *at - t } else { t - *at })
                .expect("at least one sample")
        };
        let (a, b) = (nearest(from), nearest(to));
        let d =
            a.1.iter()
                .zip(&b.1)
                .map(|(x, y)| y.saturating_sub(*x))
                .collect();
        (d, b.0.saturating_duration_since(a.0))
    }

    pub fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The CPU of each sampled process in three windows: the storm (kill →
/// last resume + 1 s), the same length of steady publishing just before the
/// kill (shorter if the warm-up is), and the rest after the storm
/// (publishing *and* delivering to every stream again).
pub struct Windows {
    storm: (Vec<Duration>, Duration),
    before: (Vec<Duration>, Duration),
    after: (Vec<Duration>, Duration),
}

impl Windows {
    pub fn of(
        sampler: &Sampler,
        kill_at: Instant,
        storm_end: Instant,
        after_end: Instant,
        warmup: Duration,
    ) -> Windows {
        let storm_len = storm_end.saturating_duration_since(kill_at);
        let before_len = storm_len.min(warmup.saturating_sub(Duration::from_secs(1)));
        Windows {
            storm: sampler.between(kill_at, storm_end),
            before: sampler.between(kill_at - before_len, kill_at),
            after: sampler.between(storm_end, after_end),
        }
    }

    /// The windows' exact lengths, in ms.
    pub fn lengths_ms(&self) -> [f64; 3] {
        [&self.storm, &self.before, &self.after].map(|w| w.1.as_secs_f64() * 1e3)
    }

    /// The storm's CPU of the processes `idx` beyond what they spend at the
    /// rate of `base`, per resume, in µs.
    fn per_resume(&self, idx: &[usize], base: &(Vec<Duration>, Duration), resumed: usize) -> f64 {
        let (storm_cpu, storm_d) = &self.storm;
        let storm: f64 = idx.iter().map(|&i| storm_cpu[i].as_secs_f64()).sum();
        let rate: f64 = idx.iter().map(|&i| base.0[i].as_secs_f64()).sum::<f64>()
            / base.1.as_secs_f64().max(1e-9);
        (storm - rate * storm_d.as_secs_f64()) * 1e6 / resumed.max(1) as f64
    }

    /// What the storm cost the processes `idx`, per resume and per second.
    pub fn cpu_of(&self, idx: &[usize], resumed: usize) -> Value {
        let sum = |v: &[Duration]| idx.iter().map(|&i| v[i].as_secs_f64()).sum::<f64>();
        let per_s = |w: &(Vec<Duration>, Duration)| sum(&w.0) * 1e3 / w.1.as_secs_f64().max(1e-9);
        json!({
            "us_per_resume": self.per_resume(idx, &self.before, resumed),
            "us_per_resume_vs_after": self.per_resume(idx, &self.after, resumed),
            "storm_cpu_ms": sum(&self.storm.0) * 1e3,
            "storm_cpu_per_s_ms": per_s(&self.storm),
            "before_cpu_per_s_ms": per_s(&self.before),
            "after_cpu_per_s_ms": per_s(&self.after),
        })
    }

    /// Busy share of the machine in each window, and the cores busy outside
    /// the first `ours` processes (anything else running on the machine);
    /// the machine's busy and total jiffies are the last two samples.
    pub fn machine_busy(&self, ours: usize) -> Value {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let busy = |(v, d): &(Vec<Duration>, Duration)| {
            let share = v[ours].as_secs_f64() / v[ours + 1].as_secs_f64().max(1e-9);
            let ours: f64 = v[..ours].iter().map(Duration::as_secs_f64).sum::<f64>()
                / d.as_secs_f64().max(1e-9);
            json!({ "share": share, "other_cores": (share * cpus - ours).max(0.0) })
        };
        json!({
            "before": busy(&self.before),
            "storm": busy(&self.storm),
            "after": busy(&self.after),
        })
    }
}
