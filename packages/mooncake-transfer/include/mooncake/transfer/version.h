// mooncake-transfer public version header (installed at mooncake/transfer/include).
#pragma once

#define MOONCAKE_TRANSFER_VERSION_MAJOR 0
#define MOONCAKE_TRANSFER_VERSION_MINOR 1
#define MOONCAKE_TRANSFER_VERSION_PATCH 0
// Wire protocol version carried in every frame header.
#define MOONCAKE_TRANSFER_WIRE_VERSION 1
