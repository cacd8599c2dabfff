"""Running a federation: the coordinator's certificates and the SuperNodes' keys (federation.certs)."""
