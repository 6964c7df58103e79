//! AES-256-XTS with the `plain64` IV: the tweak of sector `n` is `n` as a
//! 128-bit little-endian number, encrypted with the second key half. Blocks
//! are processed in batches of [`BATCH`] so the AES-NI/VAES pipelines stay full.

use aes::Aes256;
use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};

/// Blocks handed to the cipher at once: a whole 4 KiB sector. The `aes`
/// crate's VAES-512 backend works on 64 blocks at a time (VAES-256: 30,
/// AES-NI: 8) and handles shorter runs one block at a time, so small batches
/// leave most of the speed unused (measured: 16-block batches ran at a third
/// of OpenSSL's aes-256-xts on a VAES CPU).
pub const BATCH: usize = 256;

/// The key is not 64 bytes (two AES-256 keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadKeyLength(pub usize);

impl core::fmt::Display for BadKeyLength {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "aes-xts-plain64 needs a 64-byte (512-bit) key, got {} bytes", self.0)
    }
}

/// An AES-256-XTS key pair.
#[derive(Clone)]
pub struct Xts {
    data: Aes256,
    tweak: Aes256,
}

impl core::fmt::Debug for Xts {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Xts { .. }")
    }
}

/// Multiplies a tweak by α in GF(2^128) (IEEE 1619, little-endian).
#[cfg(test)]
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ (0x87 * (t >> 127))
}

/// Multiplies a tweak by α^k, 0 ≤ k < 8: a shift by k and the reduction of
/// the k bits shifted out (carry-less multiples of 0x87).
fn mul_alpha_pow(t: u128, k: u32) -> u128 {
    if k == 0 {
        return t;
    }
    let out = t >> (128 - k);
    let mut reduce = 0u128;
    for i in 0..k {
        reduce ^= (0x87 << i) * ((out >> i) & 1);
    }
    (t << k) ^ reduce
}

fn xor(block: &mut [u8; 16], t: u128) {
    *block = (u128::from_le_bytes(*block) ^ t).to_le_bytes();
}

impl Xts {
    /// Splits a 64-byte key: the first half encrypts data, the second the
    /// tweak (the dm-crypt / LUKS order).
    pub fn new(key: &[u8]) -> Result<Self, BadKeyLength> {
        if key.len() != 64 {
            return Err(BadKeyLength(key.len()));
        }
        Ok(Xts {
            data: Aes256::new_from_slice(&key[..32]).map_err(|_| BadKeyLength(key.len()))?,
            tweak: Aes256::new_from_slice(&key[32..]).map_err(|_| BadKeyLength(key.len()))?,
        })
    }

    fn process(&self, iv: u64, sector: &mut [u8], encrypt: bool) {
        let mut t = Array::from(u128::from(iv).to_le_bytes());
        self.tweak.encrypt_block(&mut t);
        let mut tweak = u128::from_le_bytes(t.into());
        let (blocks, rest) = sector.as_chunks_mut::<16>();
        assert!(rest.is_empty(), "XTS sectors are whole 16-byte blocks");
        let mut tweaks = [0u128; BATCH];
        for group in blocks.chunks_mut(BATCH) {
            // Eight lanes from one base (T·α^0 … T·α^7), so the tweak
            // computation pipelines instead of forming one long chain.
            for lanes in tweaks[..group.len()].chunks_mut(8) {
                for (k, t) in lanes.iter_mut().enumerate() {
                    *t = mul_alpha_pow(tweak, k as u32);
                }
                tweak = mul_alpha_pow(mul_alpha_pow(tweak, 7), 1);
            }
            for (block, t) in group.iter_mut().zip(tweaks.iter()) {
                xor(block, *t);
            }
            let arrays = Array::cast_slice_from_core_mut(group);
            if encrypt {
                self.data.encrypt_blocks(arrays);
            } else {
                self.data.decrypt_blocks(arrays);
            }
            for (block, t) in group.iter_mut().zip(tweaks.iter()) {
                xor(block, *t);
            }
        }
    }

    /// Encrypts one sector in place; `iv` is its plain64 sector number.
    pub fn encrypt_sector(&self, iv: u64, sector: &mut [u8]) {
        self.process(iv, sector, true);
    }

    /// Decrypts one sector in place.
    pub fn decrypt_sector(&self, iv: u64, sector: &mut [u8]) {
        self.process(iv, sector, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn ieee_1619_vector_10_aes256() {
        // IEEE P1619/D16 Annex B, vector 10: 256-bit keys, data unit 0xff,
        // plaintext 00 01 02 … ff repeated over 512 bytes (first two
        // ciphertext blocks; the proptest below checks whole sectors against
        // the `xts-mode` crate).
        let key = unhex(concat!(
            "2718281828459045235360287471352662497757247093699959574966967627",
            "3141592653589793238462643383279502884197169399375105820974944592"
        ));
        let mut data: Vec<u8> = (0..512).map(|i| i as u8).collect();
        Xts::new(&key).unwrap().encrypt_sector(0xff, &mut data);
        assert_eq!(&data[..32], &unhex("1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b")[..]);
    }

    #[test]
    fn alpha_powers_match_repeated_doubling() {
        let mut t = 0x8000_0000_0000_0000_0000_0000_0000_00ffu128 ^ 0x1234_5678_9abc_def0;
        for _ in 0..100 {
            let mut slow = t;
            for k in 0..8 {
                assert_eq!(mul_alpha_pow(t, k), slow, "k = {k}");
                slow = mul_alpha(slow);
            }
            t = t.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835) | (1 << 127);
        }
    }

    #[test]
    fn wrong_key_length_is_named() {
        assert_eq!(Xts::new(&[0; 32]).unwrap_err(), BadKeyLength(32));
        assert!(std::format!("{}", BadKeyLength(32)).contains("64-byte"));
    }

    proptest! {
        #[test]
        fn matches_the_xts_mode_crate_and_round_trips(key in proptest::collection::vec(any::<u8>(), 64), iv in any::<u64>(), big in any::<bool>(), seed in any::<u8>()) {
            use aes::cipher::KeyInit;
            let size = if big { 4096 } else { 512 };
            let plain: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(seed | 1)).collect();
            let mut ours = plain.clone();
            let x = Xts::new(&key).unwrap();
            x.encrypt_sector(iv, &mut ours);
            let reference = xts_mode::Xts128::new(
                aes::Aes256::new_from_slice(&key[..32]).unwrap(),
                aes::Aes256::new_from_slice(&key[32..]).unwrap(),
            );
            let mut theirs = plain.clone();
            reference.encrypt_sector(&mut theirs, xts_mode::get_tweak_default(u128::from(iv)));
            prop_assert_eq!(&ours, &theirs);
            x.decrypt_sector(iv, &mut ours);
            prop_assert_eq!(ours, plain);
        }
    }

    #[test]
    fn different_sectors_encrypt_differently() {
        let x = Xts::new(&[7; 64]).unwrap();
        let (mut a, mut b) = (vec![0u8; 512], vec![0u8; 512]);
        x.encrypt_sector(1, &mut a);
        x.encrypt_sector(2, &mut b);
        assert_ne!(a, b);
    }
}
