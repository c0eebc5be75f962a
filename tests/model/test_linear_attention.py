import torch

from trainer.models.attention import LinearAttention, SoftmaxAttention, relu_linear_attention


def naive_relu_linear_attention(q, k, v, key_mask, eps=1e-6):
    """The same formula evaluated with the explicit (N, N) similarity matrix."""
    similarity = torch.relu(q) @ torch.relu(k).transpose(-2, -1)  # (B, H, N, N)
    similarity = similarity * key_mask[:, None, None, :]
    return (similarity @ v) / (similarity.sum(dim=-1, keepdim=True) + eps)


def test_linear_attention_equals_naive_quadratic_evaluation():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16, generator=generator, dtype=torch.float64) for _ in range(3))
    key_mask = torch.ones(2, 37, dtype=torch.bool)
    key_mask[1, 30:] = False
    fast = relu_linear_attention(q, k, v, key_mask)
    torch.testing.assert_close(fast, naive_relu_linear_attention(q, k, v, key_mask).float(), rtol=1e-5, atol=1e-6)


def test_linear_attention_accumulates_in_fp32_under_bf16_inputs():
    q, k, v = (torch.randn(1, 2, 8, 4).bfloat16() for _ in range(3))
    assert relu_linear_attention(q, k, v).dtype == torch.float32


def test_attention_output_for_image_tokens_ignores_padded_keys():
    torch.manual_seed(0)
    for attention in (LinearAttention(32, 4, value_conv=3), SoftmaxAttention(32, 4)):
        image, text = torch.randn(1, 16, 32), torch.randn(1, 3, 32)
        padded = torch.cat([image, text, 100 * torch.randn(1, 5, 32)], dim=1)
        mask = torch.tensor([[True] * 19 + [False] * 5])
        short = attention(torch.cat([image, text], dim=1), None, (4, 4))
        long = attention(padded, mask, (4, 4))
        torch.testing.assert_close(long[:, :16], short[:, :16], rtol=1e-5, atol=1e-5)
