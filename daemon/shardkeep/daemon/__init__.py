"""shardkeep per-node daemon: shm arenas, versions, peers and the CLI."""
