"""Experimental microvm mode: image cache, task rootfs storage, launch config, sessions, reaping."""
