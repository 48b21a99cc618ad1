//! Whether the consumer of sealed groups (the online trainer) is alive.
//!
//! The trainer's supervisor sets the state; the [`GroupAssembler`](super::GroupAssembler)
//! reads it to count a sealed group that cannot reach a dead trainer as
//! `leaf_groups_dropped_total{reason="trainer_down"}` (not `queue_full`); the server reports
//! it in its status (`trainer`) and as the `leaf_trainer_up` gauge.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The trainer's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainerState {
    /// No trainer is attached (serving without online training).
    Absent,
    /// Running.
    Up,
    /// It died and is being restarted (sealed groups still queue for it).
    Restarting,
    /// It died and will not be restarted: the server is not ready for online training.
    Down,
    /// It was shut down cleanly.
    Stopped,
}

impl TrainerState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => TrainerState::Up,
            2 => TrainerState::Restarting,
            3 => TrainerState::Down,
            4 => TrainerState::Stopped,
            _ => TrainerState::Absent,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            TrainerState::Absent => 0,
            TrainerState::Up => 1,
            TrainerState::Restarting => 2,
            TrainerState::Down => 3,
            TrainerState::Stopped => 4,
        }
    }
}

/// What the status reports about the trainer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerStatus {
    /// `absent`, `up`, `restarting`, `down` or `stopped`.
    pub state: TrainerState,
    /// False when online training was asked for and the trainer is down for good.
    pub ready: bool,
    /// Restarts after a crash so far.
    pub restarts: u64,
    /// The last error or panic message, if any.
    pub last_error: Option<String>,
    /// What the promotion gate checks; `None` when candidates are promoted unchecked (or no
    /// trainer is attached).
    pub gate: Option<String>,
    /// True when the trainer promotes candidates without a held-out check.
    pub promotes_unchecked: bool,
}

/// The shared liveness record (see the module docs).
#[derive(Debug, Default)]
pub struct TrainerLiveness {
    state: AtomicU8,
    restarts: AtomicU64,
    last_error: Mutex<Option<String>>,
    gate: Mutex<Option<String>>,
}

impl TrainerLiveness {
    /// The current state.
    pub fn state(&self) -> TrainerState {
        TrainerState::from_u8(self.state.load(Ordering::SeqCst))
    }

    /// Sets the state (and the `leaf_trainer_up` gauge).
    pub fn set_state(&self, state: TrainerState) {
        self.state.store(state.as_u8(), Ordering::SeqCst);
        metrics::gauge!("leaf_trainer_up").set(if state == TrainerState::Up { 1.0 } else { 0.0 });
    }

    /// Records a crash: its message, and one more restart when `restarting`.
    pub fn record_failure(&self, message: String, restarting: bool) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
        if restarting {
            self.restarts.fetch_add(1, Ordering::SeqCst);
            metrics::counter!("leaf_trainer_restarts_total").increment(1);
        }
        self.set_state(if restarting {
            TrainerState::Restarting
        } else {
            TrainerState::Down
        });
    }

    /// Records what the promotion gate checks (`None`: unchecked).
    pub fn set_gate(&self, gate: Option<String>) {
        *self.gate.lock().unwrap_or_else(|p| p.into_inner()) = gate;
    }

    /// A snapshot for the status.
    pub fn status(&self) -> TrainerStatus {
        let state = self.state();
        let gate = self.gate.lock().unwrap_or_else(|p| p.into_inner()).clone();
        TrainerStatus {
            state,
            ready: state != TrainerState::Down,
            restarts: self.restarts.load(Ordering::SeqCst),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            promotes_unchecked: gate.is_none()
                && !matches!(state, TrainerState::Absent | TrainerState::Stopped),
            gate,
        }
    }
}
