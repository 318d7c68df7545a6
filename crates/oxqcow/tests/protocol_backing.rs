//! Backing files named by protocol (`OpenOptions::protocols`): before the
//! hook every name an image header records was resolved as a host file,
//! so an overlay on `mem://base` (here: a caller's protocol over memory)
//! could not be opened or created. The policy still applies: the gate
//! sees the name, `Forbid` refuses, `Ignore` opens nothing; deeper layers
//! inherit the opener.

use std::path::Path;
use std::sync::{Arc, Mutex};

use oxqcow::backing::{BackingGate, BackingPolicy};
use oxqcow::options::ProtocolOpener;
use oxqcow::storage::MemoryStorage;
use oxqcow::{BlockDevice, CreateOptions, Image, ImageFormat, OpenOptions, Storage};

/// `mem://base` is a 1 MiB raw disk of 0xab; `mem://gone` cannot be reached.
#[derive(Debug, Default)]
struct Mem {
    opened: Mutex<Vec<String>>,
}

impl ProtocolOpener for Mem {
    fn takes(&self, name: &str) -> bool {
        name.starts_with("mem://")
    }

    fn open_backing(&self, name: &str) -> Option<oxqcow::Result<Arc<dyn Storage>>> {
        if !self.takes(name) {
            return None;
        }
        self.opened.lock().unwrap().push(name.to_string());
        Some(match name {
            "mem://base" => Ok(Arc::new(MemoryStorage::from_bytes(vec![0xab; 1 << 20])) as Arc<dyn Storage>),
            _ => Err(oxqcow::Error::InvalidArgument("Connection refused".into())),
        })
    }
}

fn overlay(path: &Path, backing: &str, protocols: Arc<Mem>) {
    let opts = CreateOptions {
        backing_file: Some(backing.into()),
        backing_format: Some("raw".into()),
        size_given: false,
        protocols: Some(protocols),
        ..Default::default()
    };
    Image::create(path, &opts).unwrap().close().unwrap();
}

fn opts(protocols: &Arc<Mem>, backing: BackingPolicy) -> OpenOptions {
    OpenOptions { read_only: true, backing, protocols: Some(protocols.clone()), ..Default::default() }
}

#[test]
fn overlays_read_their_protocol_base_through_every_layer() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(Mem::default());
    let mid = dir.path().join("mid.qcow2");
    overlay(&mid, "mem://base", mem.clone());
    let top = dir.path().join("top.qcow2");
    let create = CreateOptions {
        backing_file: Some("mid.qcow2".into()),
        backing_format: Some("qcow2".into()),
        protocols: Some(mem.clone()),
        ..Default::default()
    };
    Image::create(&top, &create).unwrap().close().unwrap();
    let image = Image::open(&top, &opts(&mem, BackingPolicy::Follow)).unwrap();
    // The size came from the base, through the opener.
    assert_eq!(image.len(), 1 << 20);
    let mut buf = vec![0u8; 4096];
    image.read_at(&mut buf, 512 << 10).unwrap();
    assert!(buf.iter().all(|&b| b == 0xab));
    // Without the opener the name is a (missing) host file.
    assert!(Image::open(&top, &OpenOptions::new().read_only(true)).is_err());
}

#[test]
fn the_backing_policy_applies_to_protocol_names() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(Mem::default());
    let top = dir.path().join("top.qcow2");
    overlay(&top, "mem://base", mem.clone());
    mem.opened.lock().unwrap().clear();
    let e = Image::open(&top, &opts(&mem, BackingPolicy::Forbid)).err().unwrap();
    assert!(e.to_string().contains("opening backing files is forbidden"), "{e}");
    let alone = Image::open(&top, &opts(&mem, BackingPolicy::Ignore)).unwrap();
    assert!(alone.backing().is_none());
    assert!(mem.opened.lock().unwrap().is_empty(), "Forbid and Ignore opened nothing");

    #[derive(Default)]
    struct Seen(Mutex<Vec<(String, Option<ImageFormat>)>>);
    impl BackingGate for Seen {
        fn check(&self, path: &Path, format: Option<ImageFormat>) -> oxqcow::Result<()> {
            self.0.lock().unwrap().push((path.display().to_string(), format));
            Err(oxqcow::Error::InvalidArgument("refused by the gate".into()))
        }
    }
    let gate = Arc::new(Seen::default());
    let e = Image::open(&top, &opts(&mem, BackingPolicy::Gate(gate.clone()))).err().unwrap();
    assert_eq!(e.to_string(), "refused by the gate");
    assert_eq!(*gate.0.lock().unwrap(), vec![("mem://base".to_string(), Some(ImageFormat::Raw))]);
    assert!(mem.opened.lock().unwrap().is_empty(), "the gate is asked before the opener");
}

#[test]
fn an_unreachable_base_fails_with_qemu_s_words() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(Mem::default());
    let top = dir.path().join("top.qcow2");
    let create = CreateOptions {
        backing_file: Some("mem://gone".into()),
        backing_format: Some("raw".into()),
        unsafe_backing: true,
        protocols: Some(mem.clone()),
        ..CreateOptions::qcow2(1 << 20)
    };
    Image::create(&top, &create).unwrap().close().unwrap();
    let e = Image::open(&top, &opts(&mem, BackingPolicy::Follow)).err().unwrap();
    assert_eq!(e.to_string(), "Could not open backing file: Connection refused");
}
