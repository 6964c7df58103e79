//! PCI enumeration over the legacy configuration mechanism (ports 0xCF8 /
//! 0xCFC), which `pc` and `q35` both offer. Firmware (SeaBIOS or qboot) has
//! assigned the BARs; we enable memory decoding and bus mastering ourselves
//! (SeaBIOS leaves bus mastering off for virtio-serial).

use alloc::vec::Vec;

use virtio_drivers::transport::DeviceType;
use virtio_drivers::transport::pci::bus::{
    Command, ConfigurationAccess, DeviceFunction, DeviceFunctionInfo, HeaderType, PciRoot,
};
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

/// Turns on memory decoding, I/O decoding and bus mastering.
pub fn enable(root: &mut PciRoot<PortCam>, df: DeviceFunction) {
    let (_, cmd) = root.get_status_command(df);
    root.set_command(df, cmd | Command::MEMORY_SPACE | Command::IO_SPACE | Command::BUS_MASTER);
}
