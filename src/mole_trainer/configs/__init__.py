"""Default configs of the demo (copied into WORKDIR/config by `mole demo`)."""
