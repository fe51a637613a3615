"""Front doors: the gRPC listener and one folder per protocol, each a servicer plus its wire <->
internal converters, all on the one data plane."""
