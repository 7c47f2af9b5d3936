//! What each TLS 1.3 AEAD costs per tunnel packet on this machine (seal of one full QUIC
//! payload, ring as the tunnel uses it): the numbers behind the cipher preference in
//! `zone_core::trust::provider` (AES-GCM first with AES instructions, else ChaCha20-Poly1305).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ring::aead::{
    Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305,
};
use std::hint::black_box;

/// A full packet's payload at quinn's default 1,452-byte UDP payload, less header and tag.
const PACKET: usize = 1400;

fn seal(c: &mut Criterion) {
    let mut g = c.benchmark_group("aead_seal_packet");
    g.throughput(Throughput::Bytes(PACKET as u64));
    for (name, alg) in [
        ("aes128gcm", &AES_128_GCM),
        ("aes256gcm", &AES_256_GCM),
        ("chacha20poly1305", &CHACHA20_POLY1305),
    ] {
        let key = LessSafeKey::new(UnboundKey::new(alg, &[7u8; 32][..alg.key_len()]).expect("key"));
        let mut buf = vec![0x5au8; PACKET];
        g.bench_with_input(BenchmarkId::from_parameter(name), &key, |b, key| {
            b.iter(|| {
                let nonce = Nonce::assume_unique_for_key([1u8; 12]);
                let tag = key
                    .seal_in_place_separate_tag(nonce, Aad::from([0u8; 20]), &mut buf)
                    .expect("seal");
                black_box(tag.as_ref()[0]);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, seal);
criterion_main!(benches);
