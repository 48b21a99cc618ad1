//! Advantage estimators: LEAF span advantages and the GRPO baseline (being written).
