"""A tiny real guest for the VM tests: Debian's cloud kernel plus a busybox initramfs whose
/init keeps a flushed counter on its virtio disk (see :mod:`tests.guest.build_guest`)."""
