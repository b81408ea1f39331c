"""Fault injection: real worker processes killed, brokers cut, the gateway failing, and a
count of what became of every event (``make faults``)."""
