//! Our own CPU kernels for the hot quantized matmuls. candle 0.11's Q4_1 dot
//! product is scalar; these read each weight block once for every row of a
//! step (batched decode costs little more than one row) and use AVX2 where
//! the CPU has it, chosen at run time, with a scalar path that tests hold
//! them to.

pub mod bench;
pub mod q4_1;
pub mod q8;
pub mod q8_0;

/// Which implementation runs: decided once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 plus AVX-512 VNNI (`vpdpbusd`: u8×i8 dot products in one instruction).
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

pub fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let forced = std::env::var("TAILOR_KERNELS").unwrap_or_default();
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let vnni = avx2 && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl");
        match forced.as_str() {
            "scalar" => return Isa::Scalar,
            "avx2" if avx2 => return Isa::Avx2,
            _ if vnni => return Isa::Avx512Vnni,
            _ if avx2 => return Isa::Avx2,
            _ => {}
        }
    }
    Isa::Scalar
}

/// Every ISA this CPU can run (for tests and `tailor bench-kernels`).
pub fn available() -> Vec<Isa> {
    let mut all = vec![Isa::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            all.push(Isa::Avx2);
            if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                all.push(Isa::Avx512Vnni);
            }
        }
    }
    all
}

/// The ISA in use (`TAILOR_KERNELS=scalar|avx2` forces one), detected on first call.
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(detect)
}
