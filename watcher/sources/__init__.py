"""Event sources: netlink (proc connector), inotify (postmaster.pid), poll (periodic scan).

Each implements watcher.sources.base.Source; watcher.sources.choose picks one.
"""
