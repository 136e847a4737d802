# Stop VM ERP-01: graceful (off, up to 300s), then force.
#   shutdown: Stop-VM -Force (guest OS shutdown via the Shutdown integration service)
#   save:     Stop-VM -Save (memory to the replicated folder)
#   off:      Stop-VM -TurnOff -Force (power cut)
#   force (any mode, the agent's last resort): Stop-VM -TurnOff -Force
param([ValidateSet('graceful', 'force')][string]$Mode = 'graceful')
. (Join-Path $PSScriptRoot 'env.ps1')
$vm = Get-VM -Name $VmName -ErrorAction SilentlyContinue
if (-not $vm -or $vm.State -eq 'Off' -or $vm.State -eq 'Saved') { exit 0 }
if ($Mode -eq 'force') { Stop-VM -VM $vm -TurnOff -Force; exit 0 }
Stop-VM -VM $vm -TurnOff -Force
exit 0
