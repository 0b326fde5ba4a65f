"""`pgoom exec`, the container entrypoint: it sits on the database's start path, so nothing
under this package imports anything but the standard library and watcher.limits."""
