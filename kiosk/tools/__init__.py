"""Operator tools on top of the services: kiosk bench, kiosk demo, walk-up videos, status text."""
