//! [`ComputeDevice`]: where a model runs. One type for the trainer
//! ([`crate::trainer::TrainConfig::device`]) and the server (`serving::ServerConfig::device`),
//! written `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N` in JSON and on the command line.
//!
//! A GPU needs a build with the matching cargo feature of `leaf-plugin` (`cuda` or `metal`,
//! which turn on candle's and mistral.rs's back-ends); [`ComputeDevice::open`] says so by name
//! on a build without it, before anything is loaded.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a model runs. The default is the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum ComputeDevice {
    /// The CPU.
    #[default]
    Cpu,
    /// CUDA device `N` (a build with the `cuda` feature).
    Cuda(usize),
    /// Metal device `N` (a build with the `metal` feature).
    Metal(usize),
}

/// A device that cannot be named or used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The text is not a device name.
    #[error("device {0:?}: expected cpu, cuda, cuda:N, metal or metal:N")]
    Parse(String),
    /// This binary was built without the device's back-end.
    #[error(
        "device {device}: this build has no {feature} support (rebuild with \
         `--features leaf-plugin/{feature}`, or choose the cpu)"
    )]
    NotCompiled {
        /// The device asked for.
        device: ComputeDevice,
        /// The cargo feature that would enable it.
        feature: &'static str,
    },
    /// The back-end is built in, but the device could not be opened (no such GPU, no driver).
    #[error("device {device}: cannot open it: {reason}")]
    Unavailable {
        /// The device asked for.
        device: ComputeDevice,
        /// What the back-end said.
        reason: String,
    },
}

impl ComputeDevice {
    /// The cargo feature of `leaf-plugin` this device needs (`None` for the CPU).
    pub fn feature(self) -> Option<&'static str> {
        match self {
            ComputeDevice::Cpu => None,
            ComputeDevice::Cuda(_) => Some("cuda"),
            ComputeDevice::Metal(_) => Some("metal"),
        }
    }

    /// Whether this binary was built with the device's back-end.
    pub fn is_compiled(self) -> bool {
        match self {
            ComputeDevice::Cpu => true,
            ComputeDevice::Cuda(_) => cfg!(feature = "cuda"),
            ComputeDevice::Metal(_) => cfg!(feature = "metal"),
        }
    }

    /// Whether this is the CPU.
    pub fn is_cpu(self) -> bool {
        self == ComputeDevice::Cpu
    }

    /// Opens the device: [`DeviceError::NotCompiled`] on a build without its feature,
    /// [`DeviceError::Unavailable`] when the back-end cannot open it.
    pub fn open(self) -> Result<candle_core::Device, DeviceError> {
        if let (false, Some(feature)) = (self.is_compiled(), self.feature()) {
            return Err(DeviceError::NotCompiled {
                device: self,
                feature,
            });
        }
        let opened = match self {
            ComputeDevice::Cpu => return Ok(candle_core::Device::Cpu),
            ComputeDevice::Cuda(n) => candle_core::Device::new_cuda(n),
            ComputeDevice::Metal(n) => candle_core::Device::new_metal(n),
        };
        opened.map_err(|e| DeviceError::Unavailable {
            device: self,
            reason: e.to_string(),
        })
    }
}

impl fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ComputeDevice::Cpu => f.write_str("cpu"),
            ComputeDevice::Cuda(n) => write!(f, "cuda:{n}"),
            ComputeDevice::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

impl FromStr for ComputeDevice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        let bad = || DeviceError::Parse(s.to_string());
        let text = s.trim();
        let (kind, index) = match text.split_once(':') {
            Some((kind, n)) => {
                // Digits only: `usize::from_str` would also take a leading `+`.
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                (kind, Some(n.parse::<usize>().map_err(|_| bad())?))
            }
            None => (text, None),
        };
        match (kind, index) {
            ("cpu", None) => Ok(ComputeDevice::Cpu),
            ("cuda", n) => Ok(ComputeDevice::Cuda(n.unwrap_or(0))),
            ("metal", n) => Ok(ComputeDevice::Metal(n.unwrap_or(0))),
            _ => Err(bad()),
        }
    }
}

impl Serialize for ComputeDevice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ComputeDevice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        for (text, dev, printed) in [
            ("cpu", ComputeDevice::Cpu, "cpu"),
            ("cuda", ComputeDevice::Cuda(0), "cuda:0"),
            ("cuda:1", ComputeDevice::Cuda(1), "cuda:1"),
            (" cuda:12 ", ComputeDevice::Cuda(12), "cuda:12"),
            ("metal", ComputeDevice::Metal(0), "metal:0"),
            ("metal:2", ComputeDevice::Metal(2), "metal:2"),
        ] {
            assert_eq!(text.parse::<ComputeDevice>().unwrap(), dev, "{text}");
            assert_eq!(dev.to_string(), printed);
            assert_eq!(printed.parse::<ComputeDevice>().unwrap(), dev);
        }
        for bad in [
            "", "gpu", "cpu:0", "cuda:", "cuda:x", "cuda:-1", "cuda:+1", "CUDA", "cuda:1:2",
        ] {
            let e = bad.parse::<ComputeDevice>().unwrap_err();
            assert!(matches!(e, DeviceError::Parse(_)), "{bad}: {e}");
            assert!(e.to_string().contains("expected cpu, cuda"), "{e}");
        }
    }

    #[test]
    fn devices_are_strings_in_json() {
        let d: ComputeDevice = serde_json::from_str(r#""cuda:3""#).unwrap();
        assert_eq!(d, ComputeDevice::Cuda(3));
        assert_eq!(serde_json::to_string(&d).unwrap(), r#""cuda:3""#);
        let e = serde_json::from_str::<ComputeDevice>(r#""tpu""#).unwrap_err();
        assert!(e.to_string().contains("tpu"), "{e}");
        assert!(serde_json::from_str::<ComputeDevice>("0").is_err());
    }

    #[test]
    fn the_cpu_opens_and_a_missing_back_end_is_named() {
        assert!(ComputeDevice::Cpu.open().unwrap().is_cpu());
        assert!(ComputeDevice::Cpu.is_compiled());
        for (dev, feature) in [
            (ComputeDevice::Cuda(0), "cuda"),
            (ComputeDevice::Metal(0), "metal"),
        ] {
            assert_eq!(dev.feature(), Some(feature));
            if dev.is_compiled() {
                continue;
            }
            let e = dev.open().unwrap_err();
            assert!(matches!(e, DeviceError::NotCompiled { .. }), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("--features leaf-plugin/{feature}")),
                "{msg}"
            );
            assert!(msg.contains(&dev.to_string()), "{msg}");
        }
        assert_eq!(ComputeDevice::Cuda(0).is_compiled(), cfg!(feature = "cuda"));
        assert_eq!(
            ComputeDevice::Metal(0).is_compiled(),
            cfg!(feature = "metal")
        );
    }
}
