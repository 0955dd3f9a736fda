"""Launchers: Cloud TPU VMs (`python -m launch.tpu`) and N local processes (`launch/local.sh`)."""
