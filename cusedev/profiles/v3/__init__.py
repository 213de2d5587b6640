"""Profile "v3": the /dev/liveupdate ABI of the LUO v3 series (the default profile).

Everything that names a v3 command, struct, state or field lives in this folder:
``model`` (state machine and registry), ``ops`` (the ioctl table), ``client``,
``codecs`` (status, state dir, sysfs attributes, trace decoders) and ``profile``
(the ``Profile`` object registered as ``"v3"``).
"""
