//! denoise-train
