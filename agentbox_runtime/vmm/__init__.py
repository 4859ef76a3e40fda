"""VMM drivers: qemu (any Linux host) and libkrun (direct), behind one interface."""
