"""ioctl traces: record (an interceptor of the device), show, replay, and fault injection."""
