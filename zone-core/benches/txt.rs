//! Cost of the zone config's DNS TXT form: chunking a signed zone into `zg2:I/N:` strings
//! (the gateway's DNS server at every config change) and joining and decoding them again (every
//! node at start and on each refresh, from answers anyone on the path could have forged).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use zone_core::txt::{chunk, unchunk};

fn txt(c: &mut Criterion) {
    let mut g = c.benchmark_group("zone_txt");
    // 2 KB is a zone of a few devices; 240 KB is near the zone.json limit (the worst a forged
    // answer can make a node decode).
    for size in [2 * 1024, 16 * 1024, 64 * 1024, 170 * 1024] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 31 + 7) as u8).collect();
        let parts = chunk(&payload);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("chunk", size), &payload, |b, p| {
            b.iter(|| chunk(black_box(p)))
        });
        g.bench_with_input(BenchmarkId::new("unchunk", size), &parts, |b, p| {
            b.iter(|| unchunk(black_box(p)).expect("round trip"))
        });
    }
    g.finish();
}

criterion_group!(benches, txt);
criterion_main!(benches);
