//! PCI enumeration over the legacy configuration mechanism (ports 0xCF8 /
//! 0xCFC), which `pc` and `q35` both offer.
//!
//! BARs: SeaBIOS assigns them all, qboot (the fast firmware the builder
//! prefers) leaves 64-bit BARs unassigned. When any memory BAR on the
//! machine is unassigned, [`assign_bars`] lays out every memory BAR itself:
//! 32-bit BARs in `[max(3 GiB, top of low RAM), 0xFEC0_0000)` (below the
//! IOAPIC; q35's MMCONFIG at 0xB000_0000 lies under it), 64-bit BARs from the
//! first 1 GiB boundary above RAM and 4 GiB, largest first so each is
//! naturally aligned. QEMU routes every address that is not RAM to the PCI
//! address space, so no host-bridge window needs programming. We enable
//! memory decoding and bus mastering ourselves (SeaBIOS leaves bus mastering
//! off for virtio-serial); I/O decoding stays off: virtio-pci modern needs
//! none.

use alloc::vec::Vec;

use virtio_drivers::transport::DeviceType;
use virtio_drivers::transport::pci::bus::{
    BarInfo, Command, ConfigurationAccess, DeviceFunction, DeviceFunctionInfo, HeaderType, MemoryBarType, PciRoot,
};

use crate::start_info::MemRegion;
use virtio_drivers::transport::pci::virtio_device_type;

use crate::cpu::{inl, outl};

/// Configuration access through I/O ports 0xCF8/0xCFC.
#[derive(Debug, Default)]
pub struct PortCam;

fn address(df: DeviceFunction, offset: u8) -> u32 {
    0x8000_0000
        | (u32::from(df.bus) << 16)
        | (u32::from(df.device) << 11)
        | (u32::from(df.function) << 8)
        | u32::from(offset & 0xfc)
}

impl ConfigurationAccess for PortCam {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        outl(0xcf8, address(df, offset));
        inl(0xcfc)
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        outl(0xcf8, address(df, offset));
        outl(0xcfc, data);
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortCam
    }
}

/// A PCI function found during the scan.
#[derive(Clone, Debug)]
pub struct PciFunction {
    pub address: DeviceFunction,
    pub info: DeviceFunctionInfo,
    /// The virtio device type, for virtio functions.
    pub virtio: Option<DeviceType>,
}

/// Scans bus 0 and every bus behind a PCI-to-PCI bridge (bounded: each bus
/// is visited once).
pub fn scan(root: &PciRoot<PortCam>) -> Vec<PciFunction> {
    let mut found = Vec::new();
    let mut buses = alloc::vec![0u8];
    let mut seen = [false; 256];
    while let Some(bus) = buses.pop() {
        if core::mem::replace(&mut seen[bus as usize], true) {
            continue;
        }
        for (address, info) in root.enumerate_bus(bus) {
            if info.header_type == HeaderType::PciPciBridge {
                let secondary = (root_read(root, address, 0x18) >> 8) as u8;
                if secondary != 0 {
                    buses.push(secondary);
                }
            }
            let virtio = virtio_device_type(&info);
            found.push(PciFunction { address, info, virtio });
        }
    }
    found
}

fn root_read(_root: &PciRoot<PortCam>, df: DeviceFunction, offset: u8) -> u32 {
    PortCam.read_word(df, offset)
}

/// Turns on memory decoding and bus mastering.
pub fn enable(root: &mut PciRoot<PortCam>, df: DeviceFunction) {
    let (_, cmd) = root.get_status_command(df);
    root.set_command(df, cmd | Command::MEMORY_SPACE | Command::BUS_MASTER);
}

struct Bar {
    function: DeviceFunction,
    index: u8,
    size: u64,
    wide: bool,
}

const LOW_WINDOW_END: u64 = 0xfec0_0000;
const GIB: u64 = 1 << 30;

/// Assigns every memory BAR of ordinary (type 0) functions if firmware left
/// any unassigned. Returns how many BARs were (re)assigned.
pub fn assign_bars(
    root: &mut PciRoot<PortCam>,
    functions: &[PciFunction],
    ram: &[MemRegion],
) -> Result<usize, &'static str> {
    let mut bars = alloc::vec::Vec::new();
    let mut unassigned = false;
    for f in functions.iter().filter(|f| f.info.header_type == HeaderType::Standard) {
        let mut index = 0;
        while index < 6 {
            let info = root.bar_info(f.address, index).map_err(|_| "PCI BAR could not be read")?;
            let step = if info.as_ref().is_some_and(BarInfo::takes_two_entries) { 2 } else { 1 };
            if let Some(BarInfo::Memory { address_type, address, size, .. }) = info
                && size > 0
            {
                unassigned |= address == 0;
                let wide = address_type == MemoryBarType::Width64;
                bars.push(Bar { function: f.address, index, size, wide });
            }
            index += step;
        }
    }
    if !unassigned {
        return Ok(0);
    }
    let low_ram_end = ram.iter().map(|r| r.start + r.len).filter(|&e| e <= 4 * GIB).max().unwrap_or(0);
    let high_ram_end = ram.iter().map(|r| r.start + r.len).max().unwrap_or(0);
    let mut low = low_ram_end.max(3 * GIB);
    let mut high = high_ram_end.max(4 * GIB).next_multiple_of(GIB);
    for f in functions {
        let (_, cmd) = root.get_status_command(f.address);
        root.set_command(f.address, cmd - Command::MEMORY_SPACE);
    }
    bars.sort_by_key(|b| core::cmp::Reverse(b.size));
    for bar in &bars {
        if bar.wide {
            let at = high.next_multiple_of(bar.size);
            root.set_bar_64(bar.function, bar.index, at);
            high = at + bar.size;
        } else {
            let at = low.next_multiple_of(bar.size);
            if at + bar.size > LOW_WINDOW_END {
                return Err("32-bit PCI BARs do not fit below the IOAPIC; give the guest less low RAM");
            }
            root.set_bar_32(bar.function, bar.index, at as u32);
            low = at + bar.size;
        }
    }
    Ok(bars.len())
}
