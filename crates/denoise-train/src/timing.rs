//! Where a training step's time goes. Every step records the wait for the loader's next batch,
//! the step itself and the process CPU time over both (so a run says whether it is bound by
//! its patches, its device or its host). With profiling on, the step is further split into its
//! phases, each closed by a device synchronisation: on a GPU the host only queues work, and
//! without waiting for it a phase would time its launches, not its kernels.

use std::time::Instant;
use tch::Device;

/// Splits a step into named phases ([`PhaseTimer::mark`] closes one); does nothing when off.
#[derive(Debug)]
pub(crate) struct PhaseTimer {
    /// `Some` when profiling: the device to synchronise before reading the clock.
    device: Option<Device>,
    last: Instant,
    phases: Vec<(&'static str, f64)>,
}

impl PhaseTimer {
    /// A timer that records nothing and never synchronises.
    pub(crate) fn off() -> Self {
        Self {
            device: None,
            last: Instant::now(),
            phases: Vec::new(),
        }
    }

    /// A timer of the work queued on `device`.
    pub(crate) fn on(device: Device) -> Self {
        Self {
            device: Some(device),
            ..Self::off()
        }
    }

    /// Starts the first phase now (after waiting for work queued before it).
    pub(crate) fn start(&mut self) {
        if self.device.is_some() {
            self.sync();
            self.phases.clear();
            self.last = Instant::now();
        }
    }

    /// Ends the current phase as `name` once the device has finished its work.
    pub(crate) fn mark(&mut self, name: &'static str) {
        if self.device.is_some() {
            self.sync();
            let now = Instant::now();
            self.phases
                .push((name, now.duration_since(self.last).as_secs_f64()));
            self.last = now;
        }
    }

    /// The phases of the step since [`PhaseTimer::start`], in order, in seconds.
    pub(crate) fn phases(&self) -> &[(&'static str, f64)] {
        &self.phases
    }

    fn sync(&self) {
        if let Some(Device::Cuda(index)) = self.device {
            tch::Cuda::synchronize(index as i64);
        }
    }
}

/// Totals over the steps of one [`crate::Trainer::run`] call.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepTimes {
    pub steps: u64,
    /// Wall seconds spent waiting for the loader's batches.
    pub load: f64,
    /// Wall seconds in the steps themselves (copy to the device, forward, backward, update).
    pub step: f64,
    /// Process CPU seconds (all threads) over both.
    pub cpu: f64,
    /// Per phase (profiling only), in the order first seen: name and total seconds.
    pub phases: Vec<(String, f64)>,
}

impl StepTimes {
    pub(crate) fn add(&mut self, load: f64, step: f64, cpu: f64, phases: &[(&'static str, f64)]) {
        self.steps += 1;
        self.load += load;
        self.step += step;
        self.cpu += cpu;
        for &(name, secs) in phases {
            match self.phases.iter_mut().find(|(n, _)| n == name) {
                Some((_, total)) => *total += secs,
                None => self.phases.push((name.to_owned(), secs)),
            }
        }
    }

    /// The share of the wall time spent waiting for patches (0 before any step).
    pub fn load_fraction(&self) -> f64 {
        let wall = self.load + self.step;
        if wall > 0.0 { self.load / wall } else { 0.0 }
    }

    /// CPU seconds per wall second: how many cores the process kept busy on average.
    pub fn cores_busy(&self) -> f64 {
        let wall = self.load + self.step;
        if wall > 0.0 { self.cpu / wall } else { 0.0 }
    }

    /// One line for a person: the load share, the busy cores and, when profiled, each phase's
    /// mean milliseconds per step.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "{:.0}% of the time waiting for patches, {:.1} CPU cores busy",
            100.0 * self.load_fraction(),
            self.cores_busy()
        );
        if !self.phases.is_empty() && self.steps > 0 {
            let n = self.steps as f64;
            let parts: Vec<String> = self
                .phases
                .iter()
                .map(|(name, total)| format!("{name} {:.2}", 1e3 * total / n))
                .collect();
            line.push_str(&format!(
                "; mean ms per step, device synchronised: {}",
                parts.join(", ")
            ));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_off_timer_records_nothing() {
        let mut t = PhaseTimer::off();
        t.start();
        t.mark("forward");
        assert!(t.phases().is_empty());
    }

    #[test]
    fn an_on_timer_records_each_phase_in_order() {
        let mut t = PhaseTimer::on(Device::Cpu);
        t.start();
        std::thread::sleep(std::time::Duration::from_millis(5));
        t.mark("a");
        t.mark("b");
        let names: Vec<_> = t.phases().iter().map(|p| p.0).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(t.phases()[0].1 >= 0.005, "{:?}", t.phases());
        assert!(t.phases()[1].1 < t.phases()[0].1);
        // A new step starts afresh.
        t.start();
        assert!(t.phases().is_empty());
    }

    #[test]
    fn totals_give_shares_and_means() {
        let mut s = StepTimes::default();
        assert_eq!((s.load_fraction(), s.cores_busy()), (0.0, 0.0));
        s.add(1.0, 3.0, 8.0, &[("copy", 0.5), ("forward", 2.0)]);
        s.add(1.0, 3.0, 8.0, &[("copy", 0.5), ("forward", 1.0)]);
        assert_eq!(s.steps, 2);
        assert_eq!(s.load_fraction(), 0.25);
        assert_eq!(s.cores_busy(), 2.0);
        assert_eq!(
            s.phases,
            vec![("copy".to_owned(), 1.0), ("forward".to_owned(), 3.0)]
        );
        assert_eq!(
            s.summary(),
            "25% of the time waiting for patches, 2.0 CPU cores busy; mean ms per step, device \
             synchronised: copy 500.00, forward 1500.00"
        );
    }
}
