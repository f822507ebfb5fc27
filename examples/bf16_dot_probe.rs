//! Whether AVX-512 BF16's dot products would beat f32 on this CPU where AMX is missing: the throughput of
//! `vdpbf16ps` (32 bf16 products per instruction) against `vfmadd231ps` (16 f32 products), each in a loop
//! of 24 independent accumulators fed by broadcasts from memory, as a GEMM micro-kernel feeds them.
//! `bf16_dot_probe [MILLION_ITERATIONS]`; prints one JSON line per instruction, products per second.
#[cfg(target_arch = "x86_64")]
fn main() {
    let iterations = std::env::args().nth(1).and_then(|a| a.parse::<u64>().ok()).unwrap_or(50) * 1_000_000;
    if !(std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")) {
        println!("{{\"error\": \"this CPU has no AVX-512 BF16\"}}");
        return;
    }
    // SAFETY: both features were detected above.
    let (dot, fma) = unsafe { (dot_products_per_second(iterations), fma_products_per_second(iterations)) };
    println!("{{\"instruction\": \"vdpbf16ps\", \"giga_products_per_s\": {:.1}}}", dot / 1e9);
    println!("{{\"instruction\": \"vfmadd231ps\", \"giga_products_per_s\": {:.1}}}", fma / 1e9);
    println!("{{\"bf16_over_f32\": {:.2}}}", dot / fma);
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("{{\"error\": \"x86-64 only\"}}");
}

/// 12 broadcast rows × 2 columns of 16 lanes, as in a 12 × 32 micro-kernel.
#[cfg(target_arch = "x86_64")]
const ROWS: usize = 12;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dot_products_per_second(iterations: u64) -> f64 {
    use std::arch::x86_64::*;
    let a: [u32; ROWS] = std::array::from_fn(|i| 0x3c00_3c00 + i as u32);
    let b0: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3f80_3f80));
    let b1: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3f80_3f81));
    let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
    let start = std::time::Instant::now();
    for _ in 0..iterations {
        let rows = std::hint::black_box(&a);
        for (r, acc) in rows.iter().zip(acc.iter_mut()) {
            let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*r as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], x, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], x, b1);
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    std::hint::black_box(acc);
    (iterations * (ROWS * 2 * 32) as u64) as f64 / seconds
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_products_per_second(iterations: u64) -> f64 {
    use std::arch::x86_64::*;
    let a: [f32; ROWS] = std::array::from_fn(|i| 1.0 + i as f32 * 1e-3);
    let (b0, b1) = (_mm512_set1_ps(1.0001), _mm512_set1_ps(0.9999));
    let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
    let start = std::time::Instant::now();
    for _ in 0..iterations {
        let rows = std::hint::black_box(&a);
        for (r, acc) in rows.iter().zip(acc.iter_mut()) {
            let x = _mm512_set1_ps(*r);
            acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
            acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    std::hint::black_box(acc);
    (iterations * (ROWS * 2 * 16) as u64) as f64 / seconds
}
