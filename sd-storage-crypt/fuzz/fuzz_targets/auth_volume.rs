//! The provider controls every byte of an authenticated volume: after any
//! change (the fuzz input, read as (offset, xor) pairs) opening it at the
//! tenant's generation either fails, or each sector reads back exactly or
//! fails its read. Never a wrong byte, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sd_storage_crypt::auth::{Access, AuthVolume, OpenSalt, SECTOR, format};
use sd_storage_crypt::volume::{IoError, MemDevice};

const DEV: usize = 3 << 20;
const KEY: [u8; 64] = [9; 64];

fuzz_target!(|data: &[u8]| {
    let mut d = MemDevice::new(DEV);
    d.bytes[..512].copy_from_slice(&format(&KEY, DEV as u64, [1; 32], [2; 16]).unwrap());
    let mut v = AuthVolume::open(d, &KEY, 0, Access::ReadWrite(OpenSalt::from_random([1; 8]))).unwrap();
    for s in 0..8u64 {
        v.write(s * 37 * SECTOR, &[s as u8 + 1; SECTOR as usize]).unwrap();
        v.commit().unwrap();
    }
    let generation = v.generation();
    let mut model = vec![0u8; v.size() as usize];
    v.read(0, &mut model).unwrap();
    let mut d = core::mem::take(v.device());
    for c in data.chunks_exact(4) {
        let at = u32::from_le_bytes([c[0], c[1], c[2], 0]) as usize % DEV;
        d.bytes[at] ^= c[3];
    }
    if let Ok(mut v) = AuthVolume::open(d, &KEY, generation, Access::ReadOnly) {
        let mut buf = vec![0u8; SECTOR as usize];
        for s in 0..v.size() / SECTOR {
            match v.read(s * SECTOR, &mut buf) {
                Ok(()) => assert!(buf[..] == model[(s * SECTOR) as usize..][..SECTOR as usize], "sector {s} served wrong"),
                Err(e) => assert_eq!(e, IoError::Integrity),
            }
        }
    }
});
