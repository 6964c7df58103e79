//! The `virtio-drivers` HAL. Memory is identity-mapped, so a buffer's
//! physical address is its virtual address; DMA memory comes from the heap,
//! page-aligned and zeroed. There is no IOMMU in these guests.

use alloc::alloc::{Layout, alloc_zeroed, dealloc};
use core::ptr::NonNull;

use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE, PhysAddr};

/// The runtime's HAL for every virtio device.
pub struct SscHal;

fn layout(pages: usize) -> Layout {
    Layout::from_size_align(pages.max(1) * PAGE_SIZE, PAGE_SIZE).expect("DMA layout")
}

// SAFETY: `dma_alloc` returns zeroed, page-aligned memory that stays valid
// until `dma_dealloc`; with identity mapping paddr == vaddr, so the device
// and the driver see the same bytes; `mmio_phys_to_virt` maps the BAR before
// returning it.
unsafe impl Hal for SscHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // SAFETY: non-zero size.
        let p = unsafe { alloc_zeroed(layout(pages)) };
        match NonNull::new(p) {
            Some(nn) => (p as PhysAddr, nn),
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: `vaddr` came from `dma_alloc` with the same page count.
        unsafe { dealloc(vaddr.as_ptr(), layout(pages)) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        if let Err(e) = crate::paging::map_identity(paddr, size as u64, crate::paging::Caching::Uncached) {
            panic!("cannot map MMIO {paddr:#x}+{size:#x}: {e:?}");
        }
        NonNull::new(paddr as *mut u8).expect("MMIO at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
