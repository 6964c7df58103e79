//! The unikernel runtime every SSC image links.
//!
//! An image is a freestanding x86-64 ELF with a PVH entry note, built for the
//! hard-float `x86_64-unknown-linux-gnu` target with `-nostdlib` (see
//! docs/architecture.md for why not `x86_64-unknown-none`). The runtime:
//!
//! * boots from QEMU's `-kernel` through PVH into long mode ([`boot`]);
//! * identity-maps memory, on demand above 4 GiB ([`paging`]);
//! * gives `alloc` a heap over the RAM above the image;
//! * logs with timestamps on COM1 ([`logger`]);
//! * finds PCI functions ([`pci`]) and drives virtio-blk ([`blk`]) and
//!   named virtio-serial ports ([`vserial`]) through `virtio-drivers`'
//!   transports ([`hal`]);
//! * draws randomness from RDSEED/RDRAND ([`rng`]), keeps a monotonic clock
//!   ([`clock`]), and exits through `isa-debug-exit` ([`exit`]);
//! * provides the few C symbols that `core` and ring expect ([`shim`]).
//!
//! **Polling, not interrupts.** Interrupts stay disabled for an image's whole
//! life: every SD is a single event loop that polls its queues, which keeps
//! the red-zone-using prebuilt `core` safe and the runtime small. The cost is
//! a busy CPU while idle; see docs/architecture.md for when to revisit.
//!
//! An image crate provides `fn main(boot: Boot) -> ImageResult` and calls
//! [`entry!`]. Command-line tokens starting with `ssc.` are the runtime's
//! (`ssc.log=debug`, `ssc.probe=1`); the rest are the image's.
#![cfg_attr(not(test), no_std)]
// The host-test build leaves out the boot path that uses these.
#![cfg_attr(test, allow(dead_code))]

extern crate alloc;

#[cfg(not(test))]
mod boot;
#[cfg(not(test))]
mod idt;
mod logger;

pub mod blk;
pub mod clock;
pub mod control;
pub mod cpu;
pub mod exit;
pub mod hal;
pub mod paging;
pub mod pci;
pub mod rng;
pub mod serial;
pub mod shim;
pub mod start_info;
pub mod vserial;
pub mod window;

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use virtio_drivers::transport::DeviceType;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::pci::bus::PciRoot;

pub use log;
pub use start_info::MemRegion;

/// Version of the runtime, printed in the first boot line.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What an image's `main` receives.
pub struct Boot {
    /// The kernel command line (`-append`), runtime tokens included.
    pub cmdline: &'static str,
    /// RAM regions from the PVH memory map.
    pub ram: Vec<MemRegion>,
    /// Bytes given to the heap.
    pub heap_bytes: usize,
    /// The devices QEMU attached.
    pub platform: Platform,
}

impl Boot {
    /// The value of `key=value` on the command line.
    pub fn arg(&self, key: &str) -> Option<&'static str> {
        cmdline_arg(self.cmdline, key)
    }
}

fn cmdline_arg(cmdline: &'static str, key: &str) -> Option<&'static str> {
    cmdline.split_ascii_whitespace().find_map(|t| t.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// The PCI functions of this machine, and constructors for their drivers.
pub struct Platform {
    root: PciRoot<pci::PortCam>,
    functions: Vec<pci::PciFunction>,
}

/// A device could not be brought up.
#[derive(Debug)]
pub struct DeviceError(pub String);

impl core::fmt::Display for DeviceError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Platform {
    fn scan(ram: &[MemRegion]) -> Result<Self, &'static str> {
        let mut root = PciRoot::new(pci::PortCam);
        let functions = pci::scan(&root);
        let assigned = pci::assign_bars(&mut root, &functions, ram)?;
        if assigned > 0 {
            log::debug!(target: "ssc", "assigned {assigned} PCI BARs (firmware left some unassigned)");
        }
        Ok(Platform { root, functions })
    }

    /// Every PCI function found.
    pub fn functions(&self) -> &[pci::PciFunction] {
        &self.functions
    }

    fn transports(&mut self, kind: DeviceType) -> Result<Vec<PciTransport>, DeviceError> {
        let mut out = Vec::new();
        let matching: Vec<_> = self.functions.iter().filter(|f| f.virtio == Some(kind)).map(|f| f.address).collect();
        for address in matching {
            pci::enable(&mut self.root, address);
            let t = PciTransport::new::<hal::SscHal, _>(&mut self.root, address)
                .map_err(|e| DeviceError(alloc::format!("virtio {kind:?} at {address}: {e}")))?;
            out.push(t);
        }
        Ok(out)
    }

    /// Brings up every virtio-blk disk, in PCI order (= `--disk` order).
    pub fn block_devices(&mut self) -> Result<Vec<blk::BlockDevice>, DeviceError> {
        self.transports(DeviceType::Block)?
            .into_iter()
            .map(|t| blk::BlockDevice::new(t).map_err(|e| DeviceError(alloc::format!("{e}"))))
            .collect()
    }

    /// Maps every memory window (ivshmem device), in PCI order.
    pub fn memory_windows(&mut self) -> Result<Vec<window::MemoryWindow>, DeviceError> {
        let found: Vec<_> = self
            .functions
            .iter()
            .filter(|f| (f.info.vendor_id, f.info.device_id) == window::IVSHMEM)
            .cloned()
            .collect();
        found
            .iter()
            .map(|f| {
                window::MemoryWindow::new(&mut self.root, f)
                    .map_err(|e| DeviceError(alloc::format!("{e} at {}", f.address)))
            })
            .collect()
    }

    /// Brings up the virtio-serial device that carries the named links, if
    /// QEMU attached one.
    pub fn serial(&mut self) -> Result<Option<vserial::VirtioSerial>, DeviceError> {
        match self.transports(DeviceType::Console)?.into_iter().next() {
            None => Ok(None),
            Some(t) => vserial::VirtioSerial::new(t).map(Some).map_err(|e| DeviceError(alloc::format!("{e}"))),
        }
    }
}

/// An image's failure: a message for the log. Anything displayable converts
/// into it, so `?` works on every runtime error.
pub struct ImageError(pub String);

impl<E: core::fmt::Display> From<E> for ImageError {
    fn from(e: E) -> Self {
        ImageError(alloc::format!("{e}"))
    }
}

/// What an image's `main` returns.
pub type ImageResult = Result<(), ImageError>;

/// Fails the image with a formatted message.
#[macro_export]
macro_rules! bail {
    ($($t:tt)*) => { return Err($crate::ImageError($crate::alloc_format!($($t)*))) };
}

#[doc(hidden)]
pub use alloc::format as alloc_format;

/// Declares the image's main function.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[unsafe(export_name = "ssc_image_main")]
        pub fn __ssc_image_main(boot: $crate::Boot) -> $crate::ImageResult {
            $main(boot)
        }
    };
}

/// Announces that the image is ready to serve. The domain builder waits for
/// this line (`ssc: ready image=NAME boot_us=N`); `boot_us` is guest time from
/// the PVH entry's first instruction.
pub fn ready(image: &str) {
    let t = clock::since_boot();
    log::info!(target: "ssc", "ready image={image} boot_us={}", t.as_micros());
}

/// A fixed-capacity string for messages formatted where the heap may be
/// unusable (panics, exceptions). Truncates silently.
pub struct FixedString<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> FixedString<N> {
    pub const fn new() -> Self {
        FixedString { buf: [0; N], len: 0 }
    }

    pub fn as_str(&self) -> &str {
        match core::str::from_utf8(&self.buf[..self.len]) {
            Ok(s) => s,
            Err(e) => core::str::from_utf8(&self.buf[..e.valid_up_to()]).unwrap_or(""),
        }
    }
}

impl<const N: usize> Default for FixedString<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Write for FixedString<N> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let take = s.len().min(N - self.len);
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

#[cfg(not(test))]
mod start {
    use super::*;
    use crate::exit::Failure;
    use linked_list_allocator::LockedHeap;

    #[global_allocator]
    static HEAP: LockedHeap = LockedHeap::empty();

    unsafe extern "C" {
        static __image_end: u8;
    }

    unsafe extern "Rust" {
        fn ssc_image_main(boot: Boot) -> ImageResult;
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo) -> ! {
        let mut msg = FixedString::<512>::new();
        let _ = write!(msg, "panic: {info}");
        exit::fail(Failure::Panic, msg.as_str())
    }

    fn hypervisor() -> FixedString<12> {
        let mut s = FixedString::new();
        if cpu::cpuid(1, 0).ecx & (1 << 31) == 0 {
            let _ = s.write_str("none");
            return s;
        }
        let r = cpu::cpuid(0x4000_0000, 0);
        let mut raw = [0u8; 12];
        raw[0..4].copy_from_slice(&r.ebx.to_le_bytes());
        raw[4..8].copy_from_slice(&r.ecx.to_le_bytes());
        raw[8..12].copy_from_slice(&r.edx.to_le_bytes());
        for &b in raw.iter().take_while(|&&b| b != 0) {
            let _ = s.write_char(if b.is_ascii_graphic() { b as char } else { '?' });
        }
        if s.len == 0 {
            let _ = s.write_str("unnamed");
        }
        s
    }

    /// Called by the boot code in long mode with the PVH start info address.
    #[unsafe(no_mangle)]
    extern "C" fn rust_start(start_info: u32) -> ! {
        serial::init();
        idt::init();
        let tsc_source = clock::init();
        let (cmdline, regions, n) = match start_info::read_raw(u64::from(start_info)) {
            Ok(x) => x,
            Err(e) => exit::fail(Failure::BootInfo, e),
        };
        let level = match cmdline_arg(cmdline, "ssc.log") {
            Some("trace") => log::LevelFilter::Trace,
            Some("debug") => log::LevelFilter::Debug,
            Some("warn") => log::LevelFilter::Warn,
            _ => log::LevelFilter::Info,
        };
        logger::init(level);

        let image_end = (&raw const __image_end) as u64;
        let heap_start = (image_end + 4095) & !4095;
        let Some(region) = regions[..n].iter().find(|r| r.start <= heap_start && heap_start < r.start + r.len) else {
            exit::fail(Failure::BootInfo, "no RAM above the image for a heap");
        };
        let heap_end = (region.start + region.len).min(paging::BOOT_MAPPED);
        let heap_bytes = (heap_end - heap_start) as usize;
        // SAFETY: [heap_start, heap_end) is RAM from the memory map, above
        // the image, identity-mapped, and used by nothing else.
        unsafe { HEAP.lock().init(heap_start as *mut u8, heap_bytes) };

        let ram_total: u64 = regions[..n].iter().map(|r| r.len).sum();
        log::info!(
            target: "ssc",
            "runtime {VERSION}: PVH boot, {} MiB RAM, heap {} MiB, TSC {} MHz ({:?}), hypervisor {}",
            ram_total >> 20,
            heap_bytes >> 20,
            clock::tsc_hz() / 1_000_000,
            tsc_source,
            hypervisor().as_str()
        );
        match rng::init() {
            Ok(kind) => log::debug!(target: "ssc", "entropy from {kind}"),
            Err(e) => exit::fail(Failure::NoEntropy, e),
        }
        if cmdline_arg(cmdline, "ssc.probe") == Some("1") {
            probe();
        }
        let platform = match Platform::scan(&regions[..n]) {
            Ok(p) => p,
            Err(e) => exit::fail(Failure::Device, e),
        };
        let boot = Boot { cmdline, ram: regions[..n].to_vec(), heap_bytes, platform };
        // SAFETY: `ssc_image_main` is defined by the image through `entry!`
        // with exactly this signature.
        match unsafe { ssc_image_main(boot) } {
            Ok(()) => exit::success(),
            Err(ImageError(msg)) => exit::fail(Failure::CheckFailed, &msg),
        }
    }

    /// The accelerator probe (`ssc.probe=1`): SSE-width copies and a memset
    /// run in guest ring 0, which is exactly what a broken nested KVM cannot
    /// emulate. Prints the memset rate so the host can judge the speed too.
    fn probe() -> ! {
        const MIB: usize = 1 << 20;
        let mut a = alloc::vec![0u8; 4 * MIB];
        for (i, w) in a.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&(i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
        }
        let b = a.clone();
        if a != b {
            exit::fail(Failure::CheckFailed, "probe: a 4 MiB copy does not compare equal");
        }
        let start = clock::Instant::now();
        for i in 0..8u8 {
            a.fill(i);
        }
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        log::info!(target: "ssc", "probe ok memset_mib_s={:.0}", 32.0 / secs);
        exit::success()
    }
}
