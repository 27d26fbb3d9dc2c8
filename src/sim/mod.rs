//! The simulated Krea API (being written).
