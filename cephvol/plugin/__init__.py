"""cephvol as a Docker/Podman volume plugin: protocol.py answers the requests
(pure request -> response over the same library the CLI calls), server.py
is the HTTP-on-a-unix-socket edge (systemd socket activation, sd_notify)."""
