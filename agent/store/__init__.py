"""Durable, encrypted local storage: the database, vaults and keys, the wipe journal."""
