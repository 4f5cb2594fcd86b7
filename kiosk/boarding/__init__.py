"""Boarding by flight: flights, manifests, gate assignments, boarded marks, and the rules that use them.

No sockets here: the verifier core asks these plain objects, and the store behind them is an interface
(`BoardingStore`) so a database server shared by many verifier hosts can stand in for the SQLite file.
"""
