#pragma once

// Public C++ API of attnpool. Linking attnpool::attnpool also registers the
// `attnpool::*` operators with the PyTorch dispatcher.

#include <attnpool/attention_pool.h>
#include <attnpool/attention_pooling.h>
#include <attnpool/multihead_attention_pooling.h>
#include <attnpool/version.h>
