// Constants of noise spec v1 (Philox-4x32-10) and of the polynomial Box-Muller used by the CPU
// kernels. Coefficients: minimax fits rounded to float32, the same numbers as ssgd_fused.noise's
// SINCOS_POLY / LOG_POLY (tests/test_noise.py checks that they agree and bounds their error over
// every float32 input of each polynomial, within the spec's 2e-6).
#pragma once
#include <cstdint>

namespace ssgd {
namespace spec {

constexpr uint32_t PM0 = 0xD2511F53u, PM1 = 0xCD9E8D57u;  // Philox multipliers
constexpr uint32_t PW0 = 0x9E3779B9u, PW1 = 0xBB67AE85u;  // Weyl key increments

// ln(z) = f + f^2 P(f), f = z - 1, z in [sqrt(.5), sqrt(2)); stored as Q = -2P so that
// -2 ln u = k (-2 ln 2) + f (-2 + f Q(f)).
constexpr float LQ0 = -2.0f * -0x1.fffffap-2f, LQ1 = -2.0f * 0x1.5556f4p-2f, LQ2 = -2.0f * -0x1.00049ap-2f,
                LQ3 = -2.0f * 0x1.98d2c0p-3f, LQ4 = -2.0f * -0x1.535d32p-3f, LQ5 = -2.0f * 0x1.318522p-3f,
                LQ6 = -2.0f * -0x1.250490p-3f, LQ7 = -2.0f * 0x1.65c770p-4f;
constexpr float M2LN2 = -2.0f * 0x1.62e430p-1f;  // -2 ln 2
// sin(pi/2 t) = t (S0 + S1 t^2 + S2 t^4 + S3 t^6), cos(pi/2 t) = 1 + C1 t^2 + ... + C4 t^8, |t| <= 1/2
constexpr float S0 = 0x1.921fb6p+0f, S1 = -0x1.4abbbap-1f, S2 = 0x1.465e92p-4f, S3 = -0x1.2d9306p-8f;
constexpr float C1 = -0x1.3bd3ccp+0f, C2 = 0x1.03c1dep-2f, C3 = -0x1.55c664p-6f, C4 = 0x1.d9f7bcp-11f;

}  // namespace spec
}  // namespace ssgd
