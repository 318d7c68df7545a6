//! Requests that share a cluster without overlapping must not undo each
//! other when they run at once.

use std::sync::{Arc, Barrier};

use oxqcow::{BlockDevice, Compat, CreateOptions, Image, MemoryStorage};

const CLUSTER: u64 = 64 << 10;

/// Regression: a zero write over part of a cluster decided from a block
/// status taken before it locked anything that the whole cluster read as
/// zeros, then turned the whole cluster into a zero cluster. A write to the
/// other part of the cluster that landed in between was lost (found by
/// nbdcopy through `oxqcow serve`: data, then a hole starting inside the
/// same cluster).
#[test]
fn partial_zero_write_beside_a_concurrent_write_keeps_the_data() {
    for compat in [Compat::V3, Compat::V2] {
        for may_unmap in [false, true] {
            for round in 0..200u64 {
                let opts = CreateOptions::qcow2(16 * CLUSTER).compat(compat);
                let img = Arc::new(Image::create_storage(Arc::new(MemoryStorage::new()), &opts).unwrap());
                let cluster = (round % 16) * CLUSTER;
                let pattern = vec![0x5au8 ^ round as u8 | 1; 4096];
                let start = Arc::new(Barrier::new(2));
                let writer = {
                    let (img, start, pattern) = (Arc::clone(&img), Arc::clone(&start), pattern.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        img.write_at(&pattern, cluster).unwrap();
                    })
                };
                start.wait();
                img.write_zeroes_at(cluster + 4096, CLUSTER - 4096, may_unmap).unwrap();
                writer.join().unwrap();
                let mut back = vec![0u8; CLUSTER as usize];
                img.read_at(&mut back, cluster).unwrap();
                assert_eq!(&back[..4096], &pattern[..], "{compat:?} may_unmap={may_unmap} round {round}: data lost");
                assert!(back[4096..].iter().all(|&b| b == 0), "{compat:?} round {round}: zeros lost");
                let report = img.check(None).unwrap();
                assert_eq!(report.corruptions, 0, "{compat:?} round {round}: {report:?}");
            }
        }
    }
}
