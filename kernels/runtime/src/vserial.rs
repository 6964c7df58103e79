//! virtio-serial with `VIRTIO_CONSOLE_F_MULTIPORT`: named ports, lossless.
//!
//! Why our own driver: `virtio-drivers`' console driver speaks only port 0
//! (a `virtconsole`), whose data QEMU drops when the host side is slow.
//! `virtserialport` ports throttle instead (QEMU stops taking buffers from
//! the transmit queue until the host reads), but they need MULTIPORT and
//! the control queue protocol (virtio spec 5.3.6.2):
//!
//! 1. after DRIVER_OK the driver sends `DEVICE_READY`;
//! 2. the device sends `DEVICE_ADD(id)` per port; the driver answers
//!    `PORT_READY(id, 1)`;
//! 3. the device sends `PORT_NAME(id, "name")` and `PORT_OPEN(id, host
//!    connected?)`, and later `PORT_OPEN` whenever the host side connects
//!    or disconnects;
//! 4. when an image opens a port the driver posts receive buffers and sends
//!    `PORT_OPEN(id, 1)`: only then does QEMU deliver host data.
//!
//! Lossless in both directions: receive buffers are only reposted after the
//! image consumed them (QEMU waits meanwhile), a write waits until the host
//! is connected (QEMU's socket chardev drops data while no one listens) and
//! then blocks while every transmit buffer is in flight (QEMU holds them
//! while its host reader is slow). Everything is polled; no interrupts.
//!
//! Queue sizes are fixed at compile time ([`DATA_QUEUE`], [`CONTROL_QUEUE`])
//! and checked against each queue's QueueNumMax; a device offering less is
//! refused with an error naming the queue.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::time::Duration;

use bitflags::bitflags;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::Transport;
use virtio_drivers::transport::pci::PciTransport;

use crate::clock::Instant;
use crate::hal::SscHal;

/// Entries in each port's receive and transmit queue (QEMU offers 128).
pub const DATA_QUEUE: usize = 128;
/// Entries in each control queue (QEMU offers 32).
pub const CONTROL_QUEUE: usize = 32;
const RX_BUFFER: usize = 4096;
const RX_BUFFERS: usize = 64;
const TX_BUFFER: usize = 64 * 1024;
const TX_BUFFERS: usize = 64;
const CONTROL_BUFFER: usize = 256;
const MAX_PORTS: u32 = 32;

const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const DEVICE_REMOVE: u16 = 2;
const PORT_READY: u16 = 3;
const CONSOLE_PORT: u16 = 4;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;

bitflags! {
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Features: u64 {
        const SIZE = 1 << 0;
        const MULTIPORT = 1 << 1;
        const EMERG_WRITE = 1 << 2;
        const VERSION_1 = 1 << 32;
    }
}

/// What can go wrong on a virtio-serial device.
#[derive(Debug)]
pub enum SerialError {
    /// The device does not offer MULTIPORT (QEMU: use `-device
    /// virtio-serial-pci` with `virtserialport`s, not a bare console).
    NoMultiport,
    /// A queue is smaller than this driver's fixed size.
    QueueTooSmall { queue: u16, max: u32, needed: usize },
    /// The virtio layer failed.
    Virtio(virtio_drivers::Error),
    /// No port with this name appeared in time.
    NoSuchPort(String),
    /// A blocking call ran out of time.
    Timeout,
}

impl core::fmt::Display for SerialError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SerialError::NoMultiport => {
                f.write_str("virtio-serial device without MULTIPORT: attach links as `-device virtserialport,name=...`")
            }
            SerialError::QueueTooSmall { queue, max, needed } => {
                write!(f, "virtio-serial queue {queue} holds {max} entries, this driver needs {needed}")
            }
            SerialError::Virtio(e) => write!(f, "virtio-serial: {e}"),
            SerialError::NoSuchPort(name) => {
                write!(f, "no virtio-serial port named `{name}`: start the image with `--link {name}=SOCKET`")
            }
            SerialError::Timeout => f.write_str("virtio-serial: timed out"),
        }
    }
}

impl From<virtio_drivers::Error> for SerialError {
    fn from(e: virtio_drivers::Error) -> Self {
        SerialError::Virtio(e)
    }
}

/// A handle on an opened port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortId(u32);

/// One direction of a port.
type DataQueue = Box<VirtQueue<SscHal, DATA_QUEUE>>;

struct DataPath {
    rx: Box<VirtQueue<SscHal, DATA_QUEUE>>,
    tx: Box<VirtQueue<SscHal, DATA_QUEUE>>,
    rx_buffers: Vec<Box<[u8]>>,
    /// token (descriptor head) → receive buffer slot
    rx_slot_of_token: Vec<Option<usize>>,
    /// filled buffers not yet consumed: (slot, offset, end)
    /// filled buffers not yet consumed: (slot, offset, end, number of the
    /// host connection that sent them)
    rx_ready: VecDeque<(usize, usize, usize, u64)>,
    tx_buffers: Vec<Box<[u8]>>,
    tx_free: Vec<usize>,
    /// token → (slot, length)
    tx_in_flight: Vec<Option<(usize, usize)>>,
}

struct Port {
    name: Option<String>,
    added: bool,
    host_connected: bool,
    /// How many times a host process connected to the port.
    connections: u64,
    opened: bool,
    queues: Option<(DataQueue, DataQueue)>,
    data: Option<DataPath>,
}

/// A virtio-serial device with MULTIPORT.
pub struct VirtioSerial {
    transport: PciTransport,
    control_rx: VirtQueue<SscHal, CONTROL_QUEUE>,
    control_tx: VirtQueue<SscHal, CONTROL_QUEUE>,
    control_buffers: Vec<Box<[u8]>>,
    control_slot_of_token: Vec<Option<usize>>,
    ports: Vec<Port>,
}

fn rx_queue_index(port: u32) -> u16 {
    if port == 0 { 0 } else { (2 + 2 * port) as u16 }
}

fn new_queue<const N: usize>(transport: &mut PciTransport, index: u16) -> Result<VirtQueue<SscHal, N>, SerialError> {
    let max = transport.max_queue_size(index);
    if max < N as u32 {
        return Err(SerialError::QueueTooSmall { queue: index, max, needed: N });
    }
    Ok(VirtQueue::new(transport, index, false, false)?)
}

impl VirtioSerial {
    /// Negotiates MULTIPORT, creates every queue, posts control buffers and
    /// announces `DEVICE_READY`.
    pub fn new(mut transport: PciTransport) -> Result<Self, SerialError> {
        let features = transport.begin_init(Features::MULTIPORT | Features::VERSION_1);
        if !features.contains(Features::MULTIPORT) {
            return Err(SerialError::NoMultiport);
        }
        let max_ports: u32 = transport.read_config_space(4)?;
        let max_ports = max_ports.clamp(1, MAX_PORTS);
        let mut ports = Vec::with_capacity(max_ports as usize);
        for id in 0..max_ports {
            let rx = Box::new(new_queue::<DATA_QUEUE>(&mut transport, rx_queue_index(id))?);
            let tx = Box::new(new_queue::<DATA_QUEUE>(&mut transport, rx_queue_index(id) + 1)?);
            ports.push(Port {
                name: None,
                added: false,
                host_connected: false,
                connections: 0,
                opened: false,
                queues: Some((rx, tx)),
                data: None,
            });
        }
        let control_rx = new_queue::<CONTROL_QUEUE>(&mut transport, 2)?;
        let control_tx = new_queue::<CONTROL_QUEUE>(&mut transport, 3)?;
        transport.finish_init();
        let mut dev = VirtioSerial {
            transport,
            control_rx,
            control_tx,
            control_buffers: (0..CONTROL_QUEUE).map(|_| vec![0u8; CONTROL_BUFFER].into_boxed_slice()).collect(),
            control_slot_of_token: vec![None; CONTROL_QUEUE],
            ports,
        };
        for slot in 0..CONTROL_QUEUE {
            dev.post_control_buffer(slot)?;
        }
        dev.transport.notify(2);
        dev.send_control(0, DEVICE_READY, 1)?;
        Ok(dev)
    }

    fn post_control_buffer(&mut self, slot: usize) -> Result<(), SerialError> {
        let buf: &mut [u8] = &mut self.control_buffers[slot];
        // SAFETY: the buffer is a heap allocation owned by `self` that is not
        // touched again until `pop_used` returns it (see `poll_control`).
        let token = unsafe { self.control_rx.add(&[], &mut [buf])? };
        self.control_slot_of_token[token as usize] = Some(slot);
        Ok(())
    }

    fn send_control(&mut self, id: u32, event: u16, value: u16) -> Result<(), SerialError> {
        let mut msg = [0u8; 8];
        msg[0..4].copy_from_slice(&id.to_le_bytes());
        msg[4..6].copy_from_slice(&event.to_le_bytes());
        msg[6..8].copy_from_slice(&value.to_le_bytes());
        self.control_tx.add_notify_wait_pop(&[&msg], &mut [], &mut self.transport)?;
        Ok(())
    }

    /// Handles every pending control message.
    fn poll_control(&mut self) -> Result<(), SerialError> {
        let mut reposted = false;
        while let Some(token) = self.control_rx.peek_used() {
            let slot = self.control_slot_of_token[token as usize]
                .take()
                .ok_or(SerialError::Virtio(virtio_drivers::Error::WrongToken))?;
            let buf: &mut [u8] = &mut self.control_buffers[slot];
            // SAFETY: `buf` is the buffer posted with this token.
            let len = unsafe { self.control_rx.pop_used(token, &[], &mut [buf])? } as usize;
            let msg = &self.control_buffers[slot][..len.min(CONTROL_BUFFER)];
            if msg.len() >= 8 {
                let id = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
                let event = u16::from_le_bytes([msg[4], msg[5]]);
                let value = u16::from_le_bytes([msg[6], msg[7]]);
                let name = msg[8..].split(|&b| b == 0).next().map(|n| String::from_utf8_lossy(n).into_owned());
                self.handle_control(id, event, value, name)?;
            }
            self.post_control_buffer(slot)?;
            reposted = true;
        }
        if reposted && self.control_rx.should_notify() {
            self.transport.notify(2);
        }
        Ok(())
    }

    fn handle_control(&mut self, id: u32, event: u16, value: u16, name: Option<String>) -> Result<(), SerialError> {
        let Some(port) = self.ports.get_mut(id as usize) else {
            log::warn!(target: "vserial", "control event {event} for port {id} beyond max_ports; ignored");
            return Ok(());
        };
        match event {
            DEVICE_ADD => {
                port.added = true;
                self.send_control(id, PORT_READY, 1)?;
            }
            DEVICE_REMOVE => {
                port.added = false;
                port.host_connected = false;
            }
            PORT_NAME => port.name = name,
            PORT_OPEN => {
                // Bytes the old peer sent before it went away are already
                // in the receive queue (QEMU reads the socket to its end
                // before it reports the close): take them now, tagged with
                // the old connection, so a new session never sees them.
                if (value == 1) != port.host_connected
                    && let Some(data) = port.data.as_mut()
                {
                    data.reap_rx(port.connections)?;
                }
                if value == 1 && !port.host_connected {
                    port.connections += 1;
                }
                port.host_connected = value == 1;
            }
            CONSOLE_PORT => {
                log::debug!(target: "vserial", "port {id} is a console port (virtconsole); not used by images");
            }
            other => log::debug!(target: "vserial", "ignored control event {other} for port {id}"),
        }
        Ok(())
    }

    /// Names of the ports the device has announced so far.
    pub fn port_names(&self) -> Vec<String> {
        self.ports.iter().filter(|p| p.added).filter_map(|p| p.name.clone()).collect()
    }

    /// Opens the port called `name`, waiting up to `timeout` for the device
    /// to announce it.
    pub fn open(&mut self, name: &str, timeout: Duration) -> Result<PortId, SerialError> {
        let start = Instant::now();
        let id = loop {
            self.poll_control()?;
            if let Some(i) = self.ports.iter().position(|p| p.added && p.name.as_deref() == Some(name)) {
                break i;
            }
            if start.elapsed() > timeout {
                return Err(SerialError::NoSuchPort(name.into()));
            }
            core::hint::spin_loop();
        };
        let port = &mut self.ports[id];
        if port.opened {
            return Ok(PortId(id as u32));
        }
        let (rx, tx) = port.queues.take().expect("queues of an unopened port");
        let mut data = DataPath {
            rx,
            tx,
            rx_buffers: (0..RX_BUFFERS).map(|_| vec![0u8; RX_BUFFER].into_boxed_slice()).collect(),
            rx_slot_of_token: vec![None; DATA_QUEUE],
            rx_ready: VecDeque::new(),
            tx_buffers: (0..TX_BUFFERS).map(|_| vec![0u8; TX_BUFFER].into_boxed_slice()).collect(),
            tx_free: (0..TX_BUFFERS).rev().collect(),
            tx_in_flight: vec![None; DATA_QUEUE],
        };
        for slot in 0..RX_BUFFERS {
            data.post_rx(slot)?;
        }
        port.data = Some(data);
        port.opened = true;
        self.transport.notify(rx_queue_index(id as u32));
        self.send_control(id as u32, PORT_OPEN, 1)?;
        Ok(PortId(id as u32))
    }

    /// Whether a host process is connected to the port's socket.
    pub fn host_connected(&mut self, port: PortId) -> bool {
        let _ = self.poll_control();
        self.ports[port.0 as usize].host_connected
    }

    /// How many times a host process has connected to the port: a change
    /// means a new peer (and a new session for stateful protocols).
    pub fn connections(&mut self, port: PortId) -> u64 {
        let _ = self.poll_control();
        self.ports[port.0 as usize].connections
    }

    /// Moves completed receive and transmit buffers; handles control
    /// messages.
    pub fn poll(&mut self) -> Result<(), SerialError> {
        self.poll_control()?;
        for id in 0..self.ports.len() {
            let connection = self.ports[id].connections;
            let Some(data) = self.ports[id].data.as_mut() else {
                continue;
            };
            data.reap_rx(connection)?;
            data.reap_tx()?;
        }
        Ok(())
    }

    /// Copies received bytes into `buf` without waiting; returns how many.
    pub fn read(&mut self, port: PortId, buf: &mut [u8]) -> Result<usize, SerialError> {
        self.read_from(port, None, buf)
    }

    /// Like [`VirtioSerial::read`], for protocols with a session per host
    /// connection: returns only bytes that arrived on connection number
    /// `connection` (see [`VirtioSerial::connections`]), drops bytes left
    /// over from earlier connections, and leaves a later connection's bytes
    /// for its own session.
    pub fn read_connection(&mut self, port: PortId, connection: u64, buf: &mut [u8]) -> Result<usize, SerialError> {
        self.read_from(port, Some(connection), buf)
    }

    fn read_from(&mut self, port: PortId, connection: Option<u64>, buf: &mut [u8]) -> Result<usize, SerialError> {
        self.poll()?;
        let rxq = rx_queue_index(port.0);
        let data = self.data(port);
        let mut n = 0;
        let mut reposted = false;
        while n < buf.len() {
            let Some((slot, off, end, from)) = data.rx_ready.front_mut() else { break };
            let wanted = connection.is_none_or(|c| *from == c);
            if connection.is_some_and(|c| *from > c) {
                break;
            }
            let take = if wanted { (*end - *off).min(buf.len() - n) } else { *end - *off };
            if wanted {
                buf[n..n + take].copy_from_slice(&data.rx_buffers[*slot][*off..*off + take]);
                n += take;
            }
            *off += take;
            if *off == *end {
                let slot = *slot;
                data.rx_ready.pop_front();
                data.post_rx(slot)?;
                reposted = true;
            }
        }
        if reposted && data.rx.should_notify() {
            self.transport.notify(rxq);
        }
        Ok(n)
    }

    /// Fills `buf` completely, waiting up to `timeout` (forever if `None`).
    pub fn read_exact(&mut self, port: PortId, buf: &mut [u8], timeout: Option<Duration>) -> Result<(), SerialError> {
        let start = Instant::now();
        let mut got = 0;
        while got < buf.len() {
            let n = self.read(port, &mut buf[got..])?;
            got += n;
            if n == 0 {
                if timeout.is_some_and(|t| start.elapsed() > t) {
                    return Err(SerialError::Timeout);
                }
                core::hint::spin_loop();
            }
        }
        Ok(())
    }

    /// Sends all of `bytes`. Waits for the host to connect, then for free
    /// transmit buffers: never drops data.
    pub fn write_all(&mut self, port: PortId, bytes: &[u8]) -> Result<(), SerialError> {
        let mut warned = false;
        while !self.host_connected(port) {
            if !warned {
                log::info!(target: "vserial", "waiting for the host to connect to port {}", port.0);
                warned = true;
            }
            core::hint::spin_loop();
        }
        let mut sent = 0;
        while sent < bytes.len() {
            let n = self.try_write(port, &bytes[sent..])?;
            sent += n;
            if n == 0 {
                // All buffers in flight (the host is slow) or the host went
                // away: keep control messages moving while we wait.
                self.poll_control()?;
                core::hint::spin_loop();
            }
        }
        Ok(())
    }

    /// Queues as much of `bytes` as free transmit buffers hold, without
    /// waiting; returns how many bytes were taken (0 while the host is not
    /// connected or every buffer is in flight). For protocols whose peer
    /// may stop reading while it still writes (NBD clients pipeline), so
    /// the image keeps reading instead of blocking on a write.
    pub fn try_write(&mut self, port: PortId, bytes: &[u8]) -> Result<usize, SerialError> {
        let txq = rx_queue_index(port.0) + 1;
        if !self.host_connected(port) {
            return Ok(0);
        }
        let mut taken = 0;
        let data = self.data(port);
        data.reap_tx()?;
        let mut queued = false;
        for chunk in bytes.chunks(TX_BUFFER) {
            let Some(slot) = data.tx_free.pop() else { break };
            data.tx_buffers[slot][..chunk.len()].copy_from_slice(chunk);
            let buf: &[u8] = &data.tx_buffers[slot][..chunk.len()];
            // SAFETY: the buffer is owned by `data` and not touched until
            // `reap_tx` pops this token.
            let token = unsafe { data.tx.add(&[buf], &mut [])? };
            data.tx_in_flight[token as usize] = Some((slot, chunk.len()));
            taken += chunk.len();
            queued = true;
        }
        if queued && data.tx.should_notify() {
            self.transport.notify(txq);
        }
        Ok(taken)
    }

    /// Waits until the device has taken every transmitted buffer.
    pub fn flush(&mut self, port: PortId) -> Result<(), SerialError> {
        loop {
            let data = self.data(port);
            data.reap_tx()?;
            if data.tx_free.len() == TX_BUFFERS {
                return Ok(());
            }
            self.poll_control()?;
        }
    }

    fn data(&mut self, port: PortId) -> &mut DataPath {
        self.ports[port.0 as usize].data.as_mut().expect("PortId only exists for opened ports")
    }
}

impl DataPath {
    fn post_rx(&mut self, slot: usize) -> Result<(), SerialError> {
        let buf: &mut [u8] = &mut self.rx_buffers[slot];
        // SAFETY: the buffer is owned by `self` and not read or written until
        // `reap_rx` pops this token.
        let token = unsafe { self.rx.add(&[], &mut [buf])? };
        self.rx_slot_of_token[token as usize] = Some(slot);
        Ok(())
    }

    fn reap_rx(&mut self, connection: u64) -> Result<(), SerialError> {
        while let Some(token) = self.rx.peek_used() {
            let slot = self.rx_slot_of_token[token as usize]
                .take()
                .ok_or(SerialError::Virtio(virtio_drivers::Error::WrongToken))?;
            let buf: &mut [u8] = &mut self.rx_buffers[slot];
            // SAFETY: `buf` is the buffer posted with this token.
            let len = unsafe { self.rx.pop_used(token, &[], &mut [buf])? } as usize;
            self.rx_ready.push_back((slot, 0, len.min(RX_BUFFER), connection));
        }
        Ok(())
    }

    fn reap_tx(&mut self) -> Result<(), SerialError> {
        while let Some(token) = self.tx.peek_used() {
            let (slot, len) = self.tx_in_flight[token as usize]
                .take()
                .ok_or(SerialError::Virtio(virtio_drivers::Error::WrongToken))?;
            let buf: &[u8] = &self.tx_buffers[slot][..len];
            // SAFETY: `buf` is the buffer (and length) posted with this token.
            unsafe { self.tx.pop_used(token, &[buf], &mut [])? };
            self.tx_free.push(slot);
        }
        Ok(())
    }
}
