//! Batches turned into tensors one step ahead of the training loop.
//!
//! A thread takes each batch from the loader and makes its tensors while the training thread
//! runs the step before. On CUDA they are made in page-locked memory, so the copy to the device
//! is queued without waiting: a copy from ordinary (pageable) memory waits for the kernels
//! already queued, which kept the host from queuing a step ahead and took a quarter of a step
//! on a fast GPU.

use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;

use denoise_data::DataError;
use denoise_data::loader::{Batch, PatchLoader};
use tch::{Device, Tensor};

use crate::error::TrainError;

/// One batch's tensors (N x C x H x W; the noise map N x 1 x H x W), on the host.
pub(crate) struct Staged {
    pub clean: Tensor,
    pub noisy: Tensor,
    pub sigma: Option<Tensor>,
}

impl Staged {
    /// Makes `batch`'s tensors (the noise map only `with_sigma`), page-locked for `device` when
    /// it is a CUDA device, or in ordinary memory if that fails (slower, the same values; said
    /// once on stderr).
    pub(crate) fn new(batch: &Batch, device: Device, with_sigma: bool) -> Self {
        let (n, c, s) = (batch.n as i64, batch.channels as i64, batch.size as i64);
        let make = |v: &[f32], channels: i64| {
            let t = Tensor::from_slice(v).view([n, channels, s, s]);
            if !device.is_cuda() {
                return t;
            }
            // `_pin_memory`: the public `pin_memory` warns on every call that its device
            // argument is deprecated, and tch always passes one.
            match t.f_internal_pin_memory(device) {
                Ok(pinned) => pinned,
                Err(e) => {
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| {
                        eprintln!(
                            "warning: cannot page-lock the batches ({e}); their copies to the \
                             GPU will wait for it"
                        );
                    });
                    t
                }
            }
        };
        Self {
            clean: make(&batch.clean, c),
            noisy: make(&batch.noisy, c),
            sigma: batch
                .sigma
                .as_deref()
                .filter(|_| with_sigma)
                .map(|v| make(v, 1)),
        }
    }
}

/// The loader, run on its own thread, yielding [`Staged`] batches in order.
pub(crate) struct Prefetcher {
    batches: Option<Receiver<Result<Staged, DataError>>>,
    thread: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Starts staging `loader`'s batches for `device` (their noise maps only `with_sigma`); at
    /// most two wait beyond the one in use.
    pub(crate) fn start(
        mut loader: PatchLoader,
        device: Device,
        with_sigma: bool,
    ) -> Result<Self, TrainError> {
        let (tx, rx) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("batch-staging".to_owned())
            .spawn(move || {
                loop {
                    let item = loader
                        .next_batch()
                        .map(|b| Staged::new(&b, device, with_sigma));
                    let failed = item.is_err();
                    // A closed channel means the training loop is done with us.
                    if tx.send(item).is_err() || failed {
                        break;
                    }
                }
            })
            .map_err(|e| TrainError::Config(format!("cannot start the batch thread: {e}")))?;
        Ok(Self {
            batches: Some(rx),
            thread: Some(thread),
        })
    }

    /// The next batch, waiting for it if need be.
    pub(crate) fn next(&mut self) -> Result<Staged, TrainError> {
        let batches = self.batches.as_ref().expect("open until dropped");
        match batches.recv() {
            Ok(item) => Ok(item?),
            Err(_) => Err(TrainError::Config(
                "the batch thread stopped unexpectedly (it panicked: see above)".to_owned(),
            )),
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Closing the channel ends the thread at its next send; it holds at most one batch.
        drop(self.batches.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_keeps_its_values_and_shapes() {
        let batch = Batch {
            index: 0,
            epoch: 0,
            n: 2,
            channels: 3,
            size: 4,
            clean: (0..96).map(|i| i as f32).collect(),
            noisy: (0..96).map(|i| -(i as f32)).collect(),
            sigma: Some(vec![0.1; 32]),
        };
        assert!(Staged::new(&batch, Device::Cpu, false).sigma.is_none());
        let staged = Staged::new(&batch, Device::Cpu, true);
        assert_eq!(staged.clean.size(), [2, 3, 4, 4]);
        assert_eq!(staged.noisy.double_value(&[1, 2, 3, 3]), -95.0);
        assert_eq!(staged.clean.double_value(&[0, 1, 0, 2]), 18.0);
        let sigma = staged.sigma.expect("a map");
        assert_eq!(sigma.size(), [2, 1, 4, 4]);
        assert!((sigma.double_value(&[1, 0, 3, 3]) - 0.1).abs() < 1e-7);
    }
}
