//! The whole stack, end to end: Linux on rimg-vmm with a qcow2 disk served
//! by rimg-vhost-blk and a NIC served by rimg-vhost-net. On these machines
//! KVM cannot boot Linux directly, so it runs inside the nested setup (an
//! outer QEMU TCG guest with kvm_amd); prints the consoles and the final
//! `qemu-img check`. Exit status 0 when every step passed.

use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let run = rimg_tests::nested::run_linux_stack(Duration::from_secs(300));
    println!("{}", run.out.console);
    let passed = run.out.status == Some(0) && run.out.console.contains("INNER-PASS");
    if !passed {
        eprintln!("stack demo failed (status {:?})", run.out.status);
        return ExitCode::FAILURE;
    }
    let o = rimg_tests::qemu_img(&["check", run.image.to_str().unwrap()]);
    println!(
        "== qemu-img check of the image the Linux guest wrote\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    if o.status.success() {
        println!("stack demo OK");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
