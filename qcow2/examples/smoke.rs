use qcow2::*;
use std::path::Path;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let p = Path::new(&args[1]);
    let cs: u64 = args[2].parse().unwrap();
    let o = CreateOptions { size: 64 << 20, cluster_size: cs, ..Default::default() };
    create(p, &o).unwrap();
    let img = open(p, &OpenOptions { writable: true, ..Default::default() }).unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    img.write_at(&data, 12345).unwrap();
    img.write_at(&data[..1000], 40 << 20).unwrap();
    img.write_zeroes(1 << 20, 3 << 20, true).unwrap();
    img.discard(0, 128 << 10).unwrap();
    img.flush().unwrap();
    let mut back = vec![0u8; 1000];
    img.read_at(&mut back, 40 << 20).unwrap();
    assert_eq!(back, data[..1000]);
    println!("{:?}", img.as_qcow2().unwrap().check().unwrap());
}
